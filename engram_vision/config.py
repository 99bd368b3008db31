"""Typed configuration of the AR prior: `ModelConfig` (LlamaGen's c2i Transformer), `EngramConfig` (the
Engram-2D memory, docs/engram2d.md) and the named sizes `MODEL_SIZES`.

Validation here names the bad field; building modules is `engram_vision.model`, hashing `hashing.py`.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

# 2D neighbours (d_row, d_col) relative to the *target* cell; all precede it in raster order.
NAMED_NEIGHBORS: dict[str, tuple[int, int]] = {
    "L": (0, -1), "U": (-1, 0), "UL": (-1, -1), "UR": (-1, 1), "LL": (0, -2), "UU": (-2, 0),
}
_OFFSET_PATTERN = re.compile(r"^\(?\s*(-?\d+)\s*,\s*(-?\d+)\s*\)?$")


def neighbor_offset(spec: str | int, mode: str) -> tuple[int, int] | int:
    """Offset of one neighbour: (d_row, d_col) in `2d` mode (a name in NAMED_NEIGHBORS or "dr,dc"), or
    k >= 1 meaning token index target - k in `raster` mode. Raises ValueError naming a non-causal one."""
    if mode == "raster":
        try:
            back = int(spec)
        except (TypeError, ValueError):
            raise ValueError(f"raster neighbour {spec!r} must be a positive integer (tokens back)") from None
        if back < 1:
            raise ValueError(f"raster neighbour {spec!r} must be >= 1: the target itself is not yet known")
        return back
    if isinstance(spec, str) and spec in NAMED_NEIGHBORS:
        return NAMED_NEIGHBORS[spec]
    match = _OFFSET_PATTERN.match(str(spec))
    if match is None:
        raise ValueError(f"2d neighbour {spec!r} is neither one of {sorted(NAMED_NEIGHBORS)} nor 'dr,dc'")
    d_row, d_col = int(match.group(1)), int(match.group(2))
    if not (d_row < 0 or (d_row == 0 and d_col < 0)):
        raise ValueError(f"2d neighbour {spec!r} = ({d_row},{d_col}) is outside the causal half-plane "
                         f"(needs d_row < 0, or d_row == 0 and d_col < 0)")
    return d_row, d_col


@dataclass(frozen=True)
class EngramConfig:
    """Engram-2D memory: hashed n-gram tables fused through a context gate (docs/engram2d.md)."""

    layers: tuple[int, ...] = (1,)
    """0-indexed Transformer blocks that get an Engram module (added before the block's attention)."""
    mode: Literal["2d", "raster"] = "2d"
    """`2d`: neighbours are grid cells around the target; `raster`: 1D offsets back (crossing row ends)."""
    neighborhoods: tuple[tuple[str | int, ...], ...] = (("L", "U"), ("L", "U", "UL", "UR"))
    """One neighbourhood per n-gram order; 2d names (L, U, UL, UR, LL, UU or 'dr,dc') or raster ints."""
    heads_per_order: int = 8
    """Hash heads per order; each has its own prime-sized slice of the table."""
    head_dim: int = 32
    """Width of one table row; d_mem = heads_per_order x orders x head_dim."""
    rows_per_head: int = 4093
    """Rows per head before rounding up to a distinct prime (the memory budget knob)."""
    hash_seed: int = 0
    """Seed of the per-layer odd multipliers (numpy default_rng(seed + 10007 * layer))."""
    hash_label: bool = False
    """XOR the class id into every hash with its own multiplier (class-aware memory)."""
    code_map: int | None = None
    """Number of canonical ids codes are mapped to before hashing (k-means over the codebook); None: off."""
    gate: Literal["learned", "off"] | float = "learned"
    """`learned` context gate, a constant in [0, 1] (clamp), or `off` (no Engram contribution)."""
    signed_sqrt: bool = True
    """Apply sign(s) sqrt(|s|) to the gate logit before the sigmoid."""
    use_conv: bool = True
    """Add SiLU(causal depthwise conv(RMSNorm(y))) to the gated value."""
    conv_kernel: int = 4
    """Kernel size of the causal depthwise conv."""
    conv_dilation: int = 1
    """Dilation of the causal depthwise conv (e.g. the grid width to look one row up)."""
    table: Literal["trainable", "frozen"] = "trainable"
    """`trainable` (N(0,1) init) or `frozen` (N(0,1), requires_grad False)."""
    table_lr_multiplier: float = 5.0
    """Learning-rate multiplier of the tables' optimizer group."""
    table_weight_decay: float = 0.0
    """Weight decay of the tables' optimizer group."""
    table_device: Literal["device", "host"] = "device"
    """Where tables live at inference: on the model's device, or in pinned host memory."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        if isinstance(self.neighborhoods, str) or any(isinstance(order, str) for order in self.neighborhoods):
            # tuple("LU") would silently read as the neighbours L and U
            raise ValueError(f"EngramConfig.neighborhoods must be a list of lists of neighbours, e.g. "
                             f"[[L, U]], got {self.neighborhoods!r}")
        object.__setattr__(self, "neighborhoods", tuple(tuple(order) for order in self.neighborhoods))
        if not self.layers or len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
            raise ValueError(f"EngramConfig.layers must be distinct non-negative block ids, got {self.layers}")
        if self.mode not in ("2d", "raster"):
            raise ValueError(f"EngramConfig.mode must be '2d' or 'raster', got {self.mode!r}")
        if not self.neighborhoods or any(len(order) == 0 for order in self.neighborhoods):
            raise ValueError("EngramConfig.neighborhoods needs at least one non-empty neighbourhood")
        for order in self.neighborhoods:
            try:
                offsets = [neighbor_offset(n, self.mode) for n in order]  # raises on a bad or non-causal one
            except ValueError as error:
                raise ValueError(f"EngramConfig.neighborhoods: {error}") from None
            if len(set(offsets)) != len(offsets):
                raise ValueError(f"EngramConfig.neighborhoods: {order} names the same cell twice")
        for name in ("heads_per_order", "head_dim", "rows_per_head", "conv_kernel", "conv_dilation"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngramConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hash_seed < 0:  # numpy's default_rng takes non-negative seeds only
            raise ValueError(f"EngramConfig.hash_seed must be >= 0, got {self.hash_seed}")
        if self.code_map is not None and self.code_map < 2:
            raise ValueError(f"EngramConfig.code_map must be None or >= 2 canonical ids, got {self.code_map}")
        if isinstance(self.gate, str):
            if self.gate not in ("learned", "off"):
                raise ValueError(f"EngramConfig.gate must be 'learned', 'off' or a float, got {self.gate!r}")
        elif not 0.0 <= float(self.gate) <= 1.0:
            raise ValueError(f"EngramConfig.gate constant must lie in [0, 1], got {self.gate}")
        if self.table not in ("trainable", "frozen"):
            raise ValueError(f"EngramConfig.table must be 'trainable' or 'frozen', got {self.table!r}")
        if self.table_device not in ("device", "host"):
            raise ValueError(f"EngramConfig.table_device must be 'device' or 'host', got {self.table_device!r}")
        # `not x > 0` (not `x <= 0`) so NaN is rejected too.
        if not (self.table_lr_multiplier > 0 and math.isfinite(self.table_lr_multiplier)):
            raise ValueError(f"EngramConfig.table_lr_multiplier must be a finite number > 0, "
                             f"got {self.table_lr_multiplier}")
        if not (self.table_weight_decay >= 0 and math.isfinite(self.table_weight_decay)):
            raise ValueError(f"EngramConfig.table_weight_decay must be a finite number >= 0, "
                             f"got {self.table_weight_decay}")

    @property
    def num_orders(self) -> int:
        return len(self.neighborhoods)

    @property
    def num_heads(self) -> int:
        """Hash heads per Engram layer (all orders)."""
        return self.num_orders * self.heads_per_order

    @property
    def memory_dim(self) -> int:
        """d_mem: width of the concatenated head rows."""
        return self.num_heads * self.head_dim


@dataclass(frozen=True)
class ModelConfig:
    """LlamaGen's class-conditional Transformer (`ModelArgs`), optionally with Engram layers."""

    dim: int = 768
    """Model width."""
    n_layer: int = 12
    """Number of Transformer blocks."""
    n_head: int = 12
    """Attention heads; head_dim = dim // n_head."""
    n_kv_head: int | None = None
    """Key/value heads (grouped-query attention); None: n_head."""
    multiple_of: int = 256
    """SwiGLU hidden = int(2 * 4 * dim / 3) rounded up to a multiple of this."""
    ffn_dim_multiplier: float | None = None
    """Optional factor on the SwiGLU hidden size before rounding."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_base: float = 10000.0
    """RoPE base."""
    rope_zero_class: bool = True
    """LlamaGen quirk: the class position gets cos = sin = 0 (its q and k vanish); False: no rotation."""
    vocab_size: int = 16384
    """Image-token vocabulary (the tokenizer's codebook size)."""
    num_classes: int = 1000
    """Class labels; label `num_classes` is the null (unconditional) label."""
    block_size: int = 256
    """Image tokens per sample (= grid rows x columns)."""
    grid: tuple[int, int] | None = None
    """(rows, columns) of the token grid; None: a square grid of block_size (see `token_grid`)."""
    cls_token_num: int = 1
    """Class-token positions in front of the image tokens (LlamaGen c2i uses 1)."""
    class_dropout_prob: float = 0.1
    """Probability of replacing the label by the null label in training (for CFG)."""
    token_dropout_p: float = 0.1
    """Dropout on the input embeddings."""
    attn_dropout_p: float = 0.0
    """Dropout on attention weights."""
    resid_dropout_p: float = 0.1
    """Dropout on the attention output."""
    ffn_dropout_p: float = 0.1
    """Dropout on the SwiGLU output."""
    initializer_range: float = 0.02
    """Std of the N(0, std) init of linear and embedding weights (the output head starts at zero)."""
    engram: EngramConfig | None = None
    """Engram memory; None: the pure AR baseline."""

    def __post_init__(self) -> None:
        if isinstance(self.engram, dict):
            object.__setattr__(self, "engram", EngramConfig(**self.engram))
        # Sizes first, so a negative block_size is named here and not by math.isqrt below.
        for name in ("dim", "n_layer", "n_head", "vocab_size", "num_classes", "multiple_of", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.grid is not None:
            object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
            if len(self.grid) != 2 or min(self.grid) < 1:
                raise ValueError(f"ModelConfig.grid={self.grid} must be (rows, cols) with both >= 1")
            if self.grid[0] * self.grid[1] != self.block_size:
                raise ValueError(f"ModelConfig.grid={self.grid} does not match block_size={self.block_size}")
        elif math.isqrt(self.block_size) ** 2 != self.block_size:
            raise ValueError(f"ModelConfig.block_size={self.block_size} is not square: set grid=(rows, cols)")
        if self.dim % self.n_head or (self.dim // self.n_head) % 2:
            raise ValueError(f"ModelConfig.dim={self.dim} must split into n_head={self.n_head} heads of even size")
        if (self.dim // self.n_head) % 4 and self.token_grid[0] > 1:
            raise ValueError(f"ModelConfig.dim={self.dim} / n_head={self.n_head}: head_dim="
                             f"{self.dim // self.n_head} must be divisible by 4 for 2D RoPE")
        if self.n_kv_head is not None and self.n_kv_head < 1:  # 0 would silently read as None
            raise ValueError(f"ModelConfig.n_kv_head must be None or >= 1, got {self.n_kv_head}")
        n_kv = self.n_kv_head or self.n_head
        if self.n_head % n_kv:
            raise ValueError(f"ModelConfig.n_kv_head={n_kv} must divide n_head={self.n_head}")
        # `not x > 0` (not `x <= 0`) so NaN is rejected too.
        if self.ffn_dim_multiplier is not None and not (
                self.ffn_dim_multiplier > 0 and math.isfinite(self.ffn_dim_multiplier) and self.ffn_hidden >= 1):
            raise ValueError(f"ModelConfig.ffn_dim_multiplier must be None or a finite number > 0 that leaves a "
                             f"non-empty SwiGLU hidden layer, got {self.ffn_dim_multiplier}")
        for name in ("norm_eps", "rope_base"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"ModelConfig.{name} must be a finite number > 0, got {getattr(self, name)}")
        if not (self.initializer_range >= 0 and math.isfinite(self.initializer_range)):
            raise ValueError(f"ModelConfig.initializer_range must be a finite number >= 0, "
                             f"got {self.initializer_range}")
        if self.cls_token_num != 1:
            raise ValueError("ModelConfig.cls_token_num: only 1 class token is supported (LlamaGen c2i)")
        for name in ("class_dropout_prob", "token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ModelConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.engram is not None:
            bad = [layer for layer in self.engram.layers if layer >= self.n_layer]
            if bad:
                raise ValueError(f"EngramConfig.layers {bad} are beyond the model depth n_layer={self.n_layer}")

    @property
    def token_grid(self) -> tuple[int, int]:
        """(rows, columns) of the token grid: `grid`, or the square of side sqrt(block_size)."""
        if self.grid is not None:
            return self.grid
        side = math.isqrt(self.block_size)
        return side, side

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden(self) -> int:
        """SwiGLU hidden width with LlamaGen's rounding."""
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return -(-hidden // self.multiple_of) * self.multiple_of

    @property
    def seq_len(self) -> int:
        """Positions the model sees: class token + all image tokens but the last."""
        return self.cls_token_num + self.block_size - 1

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (nested engram too) that `ModelConfig(**d)` rebuilds."""
        return asdict(self)


MODEL_SIZES: dict[str, ModelConfig] = {
    # LlamaGen c2i sizes (110.9M, 342.9M, 774.7M, 1.41B, 3.10B parameters at vocab 16384, 1000 classes).
    "gpt-b": ModelConfig(dim=768, n_layer=12, n_head=12),
    "gpt-l": ModelConfig(dim=1024, n_layer=24, n_head=16),
    "gpt-xl": ModelConfig(dim=1280, n_layer=36, n_head=20),
    "gpt-xxl": ModelConfig(dim=1536, n_layer=48, n_head=24),
    "gpt-3b": ModelConfig(dim=3200, n_layer=24, n_head=32),
    # CPU sizes for the digits pipeline and tests (4x4 token grid, 10 classes).
    "gpt-tiny": ModelConfig(dim=64, n_layer=2, n_head=4, multiple_of=32, vocab_size=64, num_classes=10,
                            block_size=16),
    "gpt-small": ModelConfig(dim=128, n_layer=4, n_head=4, multiple_of=32, vocab_size=256, num_classes=10,
                             block_size=16),
}


def model_config(size: str = "gpt-b", **overrides: Any) -> ModelConfig:
    """A named size with fields replaced, e.g. `model_config("gpt-b", engram=EngramConfig(layers=(1, 6)))`."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; known sizes: {sorted(MODEL_SIZES)}")
    return replace(MODEL_SIZES[size], **overrides)


__all__ = ["NAMED_NEIGHBORS", "MODEL_SIZES", "EngramConfig", "ModelConfig", "model_config", "neighbor_offset",
           ]

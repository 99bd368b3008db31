"""`EngramGPT`: LlamaGen's class-conditional Transformer with optional Engram-2D layers.

One `forward(tokens, labels, state=None)` serves training (whole sequence, causal), prefill and decode
(with a `DecodeState`, which the model writes into; the model itself never changes in forward). Parameter
names match LlamaGen's c2i GPT, so a baseline loads their checkpoints strictly (`checkpoint.py`).
Sampling loops are `sample/generate.py`; optimizer groups `param_groups.py`; interventions `interventions.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from engram_vision.attention import Attention
from engram_vision.cache import DecodeState
from engram_vision.config import ModelConfig
from engram_vision.engram import EngramMemory
from engram_vision.hashing import HashConstants, HashParams, hash_constants, hash_rows, make_hash_params
from engram_vision.layers import FeedForward, LabelEmbedder, RMSNorm, rope_2d_table


class Block(nn.Module):
    """[Engram ->] attention -> SwiGLU, pre-norm residuals (the unit FSDP wraps)."""

    def __init__(self, config: ModelConfig, engram: EngramMemory | None = None):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config.dim, config.ffn_hidden, config.ffn_dropout_p)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.engram = engram

    def forward(self, h: Tensor, rope: Tensor, cache: tuple[Tensor, Tensor] | None, positions: Tensor,
                rows: Tensor | None = None, conv_tail: Tensor | None = None) -> Tensor:
        """cache and conv_tail: this block's attention cache and Engram conv tail in the `DecodeState`
        (None without one), which attention and Engram write into alike; rows: the Engram layer's table
        rows (or their prefetch)."""
        if self.engram is not None:
            h = h + self.engram(h, rows, conv_tail)
        h = h + self.attention(self.attention_norm(h), rope, cache, positions)
        return h + self.feed_forward(self.ffn_norm(h))


class EngramGPT(nn.Module):
    """Sequence: position 0 = class token, position p >= 1 = image token p-1; logits at p predict token p."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        engram = config.engram
        self.cls_embedding = LabelEmbedder(config.num_classes, config.dim, config.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        hash_params = make_hash_params(engram, config.vocab_size, config.num_classes) if engram else {}
        self.layers = nn.ModuleList(
            Block(config, EngramMemory(engram, config, hash_params[i]) if i in hash_params else None)
            for i in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.register_buffer("rope", rope_2d_table(config.token_grid, config.head_dim, config.rope_base,
                                                   config.cls_token_num, config.rope_zero_class), persistent=False)
        if engram is not None and engram.code_map is not None:
            # Identity-like until the training stage fits it to the tokenizer (engram_vision.code_map).
            code_map = torch.cat([torch.arange(config.vocab_size) % engram.code_map, torch.tensor([engram.code_map])])
            self.register_buffer("code_map", code_map)
        else:
            self.code_map = None
        if engram is not None:
            # The hash constants, once for all layers and laid out for `hash_rows`: checkpointed, so a model
            # always hashes with the constants it was trained with. Files that kept them per layer load too.
            constants = hash_constants(engram, [hash_params[layer] for layer in sorted(hash_params)])
            for name, value in vars(constants).items():
                self.register_buffer(f"hash_{name}", value)
            self.register_load_state_dict_pre_hook(_stack_layer_hash_constants)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LlamaGen's init: linear and embedding weights N(0, std), output head zero; Engram tables N(0,1)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
        nn.init.zeros_(self.output.weight)
        for memory in self.engram_layers():
            memory.reset_parameters()

    @torch.no_grad()
    def set_code_map(self, code_map: Tensor) -> None:
        """Install a code map [vocab_size + 1] (e.g. `engram_vision.code_map.fit_code_map` of the tokenizer's
        codebook): raw ids, PAD included, to canonical ids in [0, EngramConfig.code_map]."""
        engram = self.config.engram
        if engram is None or engram.code_map is None:
            raise ValueError("set_code_map needs EngramConfig.code_map (the number of canonical ids) to be set")
        expected = (self.config.vocab_size + 1,)
        if tuple(code_map.shape) != expected:
            raise ValueError(f"code map must have shape {expected} (codes + PAD), got {tuple(code_map.shape)}")
        if int(code_map.min()) < 0 or int(code_map.max()) > engram.code_map or int(code_map[-1]) != engram.code_map:
            raise ValueError(f"code map values must lie in [0, {engram.code_map}] with PAD -> {engram.code_map}")
        self.code_map.copy_(code_map.to(self.code_map))

    def backbone_state_dict(self) -> dict[str, Tensor]:
        """The state dict without the Engram layers, their hash constants and the code map: what the same
        model without Engram (`engram=None`) loads strictly."""
        return {k: v for k, v in self.state_dict().items()
                if ".engram." not in k and not k.startswith("hash_") and k != "code_map"}

    def engram_layers(self) -> list[EngramMemory]:
        return [block.engram for block in self.layers if block.engram is not None]

    def engram_rows(self, history: Tensor, positions: Tensor, labels: Tensor) -> Tensor:
        """Table rows of every Engram layer, int64 [layers, B, P, heads], hashed together on the tokens'
        device (the neighbourhood gather is shared; only multipliers and primes differ per layer).
        positions: built by `forward` from a checked length, so not validated again here."""
        constants = HashConstants(self.hash_slot_multipliers, self.hash_label_multipliers, self.hash_primes,
                                  self.hash_offsets)
        return hash_rows(history, positions, labels, self.config.token_grid, self.config.engram, constants,
                         pad_id=self.config.vocab_size, code_map=self.code_map, check_positions=False)

    def _check_inputs(self, tokens: Tensor, labels: Tensor) -> None:
        c = self.config
        if tokens.ndim != 2 or labels.ndim != 1 or labels.shape[0] != tokens.shape[0]:
            raise ValueError(f"tokens must be [B,T] and labels [B]; got {tuple(tokens.shape)} and {tuple(labels.shape)}")
        top = c.num_classes + int(self.cls_embedding.has_null) - 1
        # One host sync per call (this runs every training step); details only once something is wrong.
        bad = ((tokens < 0) | (tokens >= c.vocab_size)).any() | ((labels < 0) | (labels > top)).any()
        if not bool(bad):
            return
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= c.vocab_size):
            raise ValueError(f"tokens must lie in [0, {c.vocab_size}), got [{int(tokens.min())}, {int(tokens.max())}]")
        if int(labels.min()) < 0 or int(labels.max()) > top:
            raise ValueError(f"labels must lie in [0, {top}] ({c.num_classes} = null label"
                             f"{'' if self.cls_embedding.has_null else ', absent: class_dropout_prob is 0'}); "
                             f"got [{int(labels.min())}, {int(labels.max())}]")

    def forward(self, tokens: Tensor, labels: Tensor, state: DecodeState | None = None,
                engram_tokens: Tensor | None = None, engram_labels: Tensor | None = None) -> Tensor:
        """Logits [B, positions, vocab] in float32.

        Without `state`: tokens [B,T] (T <= block_size - 1) are the inputs after the class token; returns
        T + 1 positions (training: targets are the T + 1 image tokens). With `state`: the first call adds
        the class token; each call continues at `state.position`, writes the caches and returns the new
        positions. Decode steps read no host value, so they compile to one graph (`sample/generate.py`).
        engram_tokens [B,T] / engram_labels [B]: a donor sequence (and its class, which only models with
        `hash_label` read) that the Engram layers hash instead of `tokens` / `labels` (probes only).
        """
        c = self.config
        with_class = state is None or not state.started
        if with_class:
            self._check_inputs(tokens, labels)
            embeddings = torch.cat([self.cls_embedding(labels, drop=self.training), self.tok_embeddings(tokens)], 1)
        else:
            embeddings = self.tok_embeddings(tokens)
        length = embeddings.shape[1]
        offsets = torch.arange(length, device=tokens.device)
        if state is None:
            if length > c.seq_len:
                raise ValueError(f"sequence of {length} positions exceeds the model's {c.seq_len}")
            positions, history = offsets, tokens
        else:
            positions = state.position + offsets
            # On the device, without a host sync; a violation surfaces at the next kernel launch.
            torch._assert_async(positions[-1] < c.seq_len, "decoding past the model's sequence length")
            # The inputs are image tokens at sequence positions p >= 1, i.e. image-token index p - 1.
            state.tokens.index_copy_(1, positions[int(with_class):] - 1, tokens)
            history = state.tokens
        if engram_tokens is not None:
            if state is not None or engram_tokens.shape != tokens.shape:
                raise ValueError("engram_tokens must match tokens' shape and is only used without a state")
            history = engram_tokens
        hash_labels = labels
        if engram_labels is not None:
            if state is not None or engram_labels.shape != labels.shape:
                raise ValueError("engram_labels must match labels' shape and is only used without a state")
            hash_labels = engram_labels
        rows = {}
        if c.engram is not None:
            # Hashed once for all layers, from tokens alone: host tables start fetching their rows here,
            # before the blocks are queued.
            all_rows = self.engram_rows(history, positions, hash_labels)
            rows = {memory.layer_id: memory.prefetch(layer_rows)
                    for memory, layer_rows in zip(self.engram_layers(), all_rows, strict=True)}
        h = self.tok_dropout(embeddings)
        rope = self.rope[positions] if state is not None else self.rope[:length]
        for index, block in enumerate(self.layers):
            cache = None if state is None else (state.keys[index], state.values[index])
            conv_tail = None if state is None else state.conv_tails.get(index)
            h = block(h, rope, cache, positions, rows.get(index), conv_tail)
        if state is not None:
            state.position.add_(length)
            state.started = True
        return self.output(self.norm(h)).float()


def _stack_layer_hash_constants(model: EngramGPT, state_dict: dict, prefix: str, *args) -> None:
    """Load hook: files written before the model kept the hash constants once held them per Engram layer
    (`layers.<i>.engram.{multipliers,primes,offsets}`); lay those out as the model's `hash_*` buffers."""
    layers = sorted(model.config.engram.layers)
    keys = {layer: [f"{prefix}layers.{layer}.engram.{name}" for name in ("multipliers", "primes", "offsets")]
            for layer in layers}
    if f"{prefix}hash_primes" in state_dict or not all(k in state_dict for names in keys.values() for k in names):
        return
    params = []
    for layer in layers:
        multipliers, primes, offsets = (state_dict.pop(key) for key in keys[layer])
        params.append(HashParams(layer, multipliers, primes, offsets, int(primes.sum())))
    for name, value in vars(hash_constants(model.config.engram, params)).items():
        state_dict[f"{prefix}hash_{name}"] = value

"""LPIPS perceptual distance (the v0.1 "vgg" variant) for training VQ tokenizers.

`LPIPS` maps two image batches in [-1, 1] to one distance per image ([B]). It is a frozen module: every
parameter has `requires_grad=False` and it stays in eval mode even when a parent calls `.train()`, while
gradients still flow to the input images, so it can sit inside a loss module.

Weights are never downloaded. `LPIPS.from_weights` reads two local files: torchvision's VGG16 checkpoint
(only its `features.*` part is used) and the released LPIPS linear-layer file. What this file leaves to
others: weighting and averaging the distance into a loss (`losses.py`), putting the files in place (the
researcher; the error message says where), and moving the module to a device (the caller).
"""

# Follows Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"
# (github.com/richzhang/PerceptualSimilarity, lpips v0.1), as used by taming-transformers and LlamaGen.

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

# Indices into torchvision's vgg16().features right after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_TAP_INDICES: tuple[int, ...] = (3, 8, 15, 22, 29)
_TAP_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)
# ImageNet statistics re-expressed for inputs in [-1, 1] (the released LPIPS ScalingLayer constants).
_SHIFT: tuple[float, float, float] = (-0.030, -0.088, -0.188)
_SCALE: tuple[float, float, float] = (0.458, 0.448, 0.450)
_NORM_EPS = 1e-10

VGG_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
VGG_FILENAME = "vgg16-397923af.pth"
LPIPS_FILENAME = "lpips_vgg_v0.1.pth"


def default_vgg_path() -> Path:
    """torchvision's own cache location for VGG16 ImageNet weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG_FILENAME


def default_lpips_path() -> Path:
    """Where we expect the released LPIPS v0.1 vgg linear weights, beside torchvision's file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_FILENAME


class _LinLayer(nn.Module):
    """1x1 conv without bias that weighs one tap's channels; keys match the released `linK.model.1.weight`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        # model.0 is a Dropout in the original; it never fires in eval mode, which LPIPS is always in, so an
        # Identity keeps the state-dict layout without any chance of randomness.
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))
        # Before loading, weight every channel 1: the paper's uncalibrated baseline (lpips=False), which is a
        # non-negative distance, rather than a random signed one.
        nn.init.ones_(self.model[1].weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def _unit_normalize(features: Tensor) -> Tensor:
    """Divide each spatial position's channel vector by its L2 norm (+eps), as in LPIPS.

    `vector_norm` rather than sqrt(sum(x**2)): its backward is 0 at a zero norm where the sqrt form gives NaN.
    After a ReLU tap that NaN happens to be masked, but the helper should not rely on what feeds it.
    Forward values are the same.
    """
    norm = torch.linalg.vector_norm(features, dim=1, keepdim=True)
    return features / (norm + _NORM_EPS)


def _vgg16_features() -> nn.Sequential:
    """torchvision's VGG16 `features` with torchvision's init, without allocating the 120M-param classifier."""
    # Building on the meta device skips the classifier's costly random init (seconds on CPU); only the
    # convolutional part is then materialised and initialised the way torchvision's VGG does it.
    with torch.device("meta"):
        vgg = torchvision.models.vgg16(weights=None)
    # Materialise where the caller builds (CPU, or the meta device for shape-only builds).
    features = vgg.features.to_empty(device=torch.get_default_device())
    for module in features.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
    return features


def _missing_file_message(path: Path, what: str, url: str, default: Path) -> str:
    return (
        f"LPIPS needs the {what} weights file and {str(path)!r} does not exist. Put the file at "
        f"{str(default)!r} (the default location) or pass its path in VQLossConfig "
        f"(`vgg_weights` / `lpips_weights`). Researchers get it from {url} and save it as {default.name!r}. "
        "Nothing is downloaded automatically."
    )


def _load_state(path: Path) -> dict[str, Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, expected a state dict of tensors.")
    return state


class LPIPS(nn.Module):
    """Frozen LPIPS-vgg distance. `LPIPS()` has untrained weights; use `LPIPS.from_weights()` for real use.

    `LPIPS()` alone has a randomly initialised VGG and unit channel weights; it exists so `from_weights` (and
    meta-device builds) have an architecture to load into.

    Attributes:
        features: torchvision's VGG16 `features` (state-dict keys `features.0.weight` ...).
        lin0 ... lin4: per-tap channel weights, keys `linK.model.1.weight` as in the released LPIPS file.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = _vgg16_features()
        self.lin0 = _LinLayer(_TAP_CHANNELS[0])
        self.lin1 = _LinLayer(_TAP_CHANNELS[1])
        self.lin2 = _LinLayer(_TAP_CHANNELS[2])
        self.lin3 = _LinLayer(_TAP_CHANNELS[3])
        self.lin4 = _LinLayer(_TAP_CHANNELS[4])
        # Constants, not weights: non-persistent so they are neither expected in files nor saved.
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.train(False)

    @property
    def lins(self) -> tuple[_LinLayer, ...]:
        return (self.lin0, self.lin1, self.lin2, self.lin3, self.lin4)

    @classmethod
    def from_weights(cls, vgg_path: str | None = None, lpips_path: str | None = None) -> LPIPS:
        """Build LPIPS from local files (no network).

        Args:
            vgg_path: torchvision VGG16 state dict (full, with `classifier.*`, or `features.*` only).
                Default: `<torch hub dir>/checkpoints/vgg16-397923af.pth`.
            lpips_path: released LPIPS v0.1 vgg file with keys `lin0.model.1.weight` ... `lin4.model.1.weight`.
                Default: `<torch hub dir>/checkpoints/lpips_vgg_v0.1.pth`.
        """
        vgg_file = Path(vgg_path) if vgg_path is not None else default_vgg_path()
        lpips_file = Path(lpips_path) if lpips_path is not None else default_lpips_path()
        # Check both files before reading either (the VGG file is ~0.5 GB), and report every missing one.
        wanted = (
            (vgg_file, "VGG16 (torchvision ImageNet)", VGG_URL, default_vgg_path()),
            (lpips_file, "LPIPS v0.1 vgg linear-layer", LPIPS_URL, default_lpips_path()),
        )
        missing = [_missing_file_message(*entry) for entry in wanted if not entry[0].is_file()]
        if missing:
            raise FileNotFoundError(
                "\n".join(missing)
                + "\nTo train without LPIPS, set `perceptual_weight: 0` in the loss config."
            )
        vgg_state, lin_state = _load_state(vgg_file), _load_state(lpips_file)
        module = cls()
        module.load_vgg_state(vgg_state, source=str(vgg_file))
        module.load_lin_state(lin_state, source=str(lpips_file))
        return module

    def load_vgg_state(self, state: dict[str, Tensor], source: str = "<state dict>") -> None:
        """Strictly load the `features.*` entries of a torchvision VGG16 state dict (other keys are ignored)."""
        prefix = "features."
        features = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not features:
            # Also accept `vgg.features.state_dict()` saved on its own (keys `0.weight`, ...).
            features = dict(state)
        try:
            self.features.load_state_dict(features, strict=True)
        except RuntimeError as err:
            raise ValueError(
                f"{source!r} is not a torchvision VGG16 state dict (expected keys features.0.weight ... "
                f"features.28.bias with VGG16 shapes): {err}"
            ) from err

    def load_lin_state(self, state: dict[str, Tensor], source: str = "<state dict>") -> None:
        """Strictly load `lin0.model.1.weight` ... `lin4.model.1.weight` (shapes [1,C,1,1])."""
        for index, lin in enumerate(self.lins):
            key = f"lin{index}.model.1.weight"
            expected = lin.model[1].weight.shape
            if key not in state:
                raise ValueError(f"{source!r} lacks {key!r}; it is not an LPIPS v0.1 vgg weights file.")
            if state[key].shape != expected:
                raise ValueError(
                    f"{source!r}: {key!r} has shape {tuple(state[key].shape)}, expected {tuple(expected)} "
                    "(is it the LPIPS file for a different backbone than vgg?)."
                )
            with torch.no_grad():
                lin.model[1].weight.copy_(state[key])

    def train(self, mode: bool = True) -> LPIPS:
        """Ignore `mode`: LPIPS is a fixed metric, so it always runs in eval mode."""
        return super().train(False)

    def _taps(self, images: Tensor) -> list[Tensor]:
        """VGG activations after relu1_2 ... relu5_3 for scaled inputs; [B,C_k,H_k,W_k] each."""
        taps: list[Tensor] = []
        x = (images - self.shift) / self.scale
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in _TAP_INDICES:
                taps.append(x)
                if len(taps) == len(_TAP_INDICES):
                    break  # the final max-pool is not used
        return taps

    def forward(self, images: Tensor, reconstructions: Tensor) -> Tensor:
        """LPIPS distance per image.

        Args:
            images: float [B,3,H,W] in [-1, 1].
            reconstructions: float [B,3,H,W] in [-1, 1].
        Returns:
            float [B], 0 for identical inputs, symmetric in its arguments.
        """
        if images.shape != reconstructions.shape:
            raise ValueError(
                f"LPIPS inputs differ in shape: {tuple(images.shape)} vs {tuple(reconstructions.shape)}"
            )
        # One VGG pass for both batches halves kernel launches; LPIPS has no cross-sample interaction.
        taps = self._taps(torch.cat([images, reconstructions], dim=0))
        batch = images.shape[0]
        distance = images.new_zeros(batch)
        for tap, lin in zip(taps, self.lins, strict=True):
            a, b = _unit_normalize(tap[:batch]), _unit_normalize(tap[batch:])
            distance = distance + lin((a - b) ** 2).mean(dim=(1, 2, 3))
        return distance

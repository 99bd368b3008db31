"""Tests for tokenizers_vq.lpips: loading local weight files, the distance's arithmetic, and freezing.

The tests write their own random weights (no downloads); a hand-written LPIPS on torchvision's VGG16 is the
reference the module must match.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from tokenizers_vq.lpips import LPIPS, LPIPS_URL, VGG_URL

CHANNELS = (64, 128, 256, 512, 512)
SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # up to relu1_2 ... relu5_3


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random VGG16 features (features-only and full-style files) and random positive lin weights."""
    root = tmp_path_factory.mktemp("lpips_weights")
    gen = torch.Generator().manual_seed(0)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    state: dict[str, torch.Tensor] = {}
    for key, value in features.state_dict().items():
        if key.endswith("weight"):
            fan_in = value[0].numel()
            state[f"features.{key}"] = torch.randn(value.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        else:  # non-zero biases so a bias that failed to load would show
            state[f"features.{key}"] = 0.05 * torch.randn(value.shape, generator=gen)
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen) for i, c in enumerate(CHANNELS)}
    full = dict(state)
    # A torchvision checkpoint also holds the classifier; tiny stand-ins suffice since LPIPS ignores them.
    for index in (0, 3, 6):
        full[f"classifier.{index}.weight"] = torch.randn(2, 2, generator=gen)
        full[f"classifier.{index}.bias"] = torch.randn(2, generator=gen)
    paths = {"features": root / "vgg_features.pth", "full": root / "vgg_full.pth", "lin": root / "lin.pth"}
    torch.save(state, paths["features"])
    torch.save(full, paths["full"])
    torch.save(lins, paths["lin"])
    return paths


@pytest.fixture(scope="module")
def lpips(weight_files: dict[str, Path]) -> LPIPS:
    return LPIPS.from_weights(str(weight_files["features"]), str(weight_files["lin"]))


def _images(seed: int, batch: int = 2, size: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=gen) * 2 - 1


def test_identical_images_have_zero_distance(lpips: LPIPS) -> None:
    x = _images(1)
    distance = lpips(x, x)
    assert distance.shape == (2,)
    assert distance.abs().max().item() < 1e-6


def test_different_images_have_positive_symmetric_distance(lpips: LPIPS) -> None:
    x, y = _images(1), _images(2)
    d_xy, d_yx = lpips(x, y), lpips(y, x)
    assert d_xy.shape == (2,)
    assert (d_xy > 1e-3).all()
    torch.testing.assert_close(d_xy, d_yx, rtol=0, atol=1e-6)


def test_distance_grows_with_perturbation(lpips: LPIPS) -> None:
    x = _images(3)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    small, large = lpips(x, x + 0.01 * noise), lpips(x, x + 0.3 * noise)
    assert (small < large).all()
    assert (small > 0).all()


def test_gradient_reaches_input_but_not_weights(lpips: LPIPS) -> None:
    x = _images(5).requires_grad_(True)
    y = _images(6)
    lpips(x, y).sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum().item() > 0
    assert all(not p.requires_grad and p.grad is None for p in lpips.parameters())


def test_gradient_vanishes_at_identical_inputs(lpips: LPIPS) -> None:
    # x == y is the distance's minimum: every squared difference has zero slope there.
    x = _images(11).requires_grad_(True)
    lpips(x, x.detach().clone()).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().max().item() < 1e-10


def test_loaded_weights_equal_the_files(lpips: LPIPS, weight_files: dict[str, Path]) -> None:
    lins = torch.load(weight_files["lin"], weights_only=True)
    state = lpips.state_dict()
    for key, value in lins.items():
        assert torch.equal(state[key], value), key
    vgg = torch.load(weight_files["features"], weights_only=True)
    for key, value in vgg.items():
        assert torch.equal(state[key], value), key
    # Only VGG features and the five lin weights are state; the scaling constants are not.
    assert set(state) == set(vgg) | set(lins)


def test_full_torchvision_state_dict_loads_the_same(lpips: LPIPS, weight_files: dict[str, Path]) -> None:
    other = LPIPS.from_weights(str(weight_files["full"]), str(weight_files["lin"]))
    x, y = _images(7), _images(8)
    torch.testing.assert_close(other(x, y), lpips(x, y), rtol=0, atol=0)


def test_matches_hand_computation_on_torchvision_vgg(lpips: LPIPS, weight_files: dict[str, Path]) -> None:
    # torchvision's vgg16() builds its `features` with exactly this call; skipping the classifier saves seconds.
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"]).eval()
    full = torch.load(weight_files["full"], weights_only=True)
    features.load_state_dict({k[len("features.") :]: v for k, v in full.items() if k.startswith("features.")})
    lins = torch.load(weight_files["lin"], weights_only=True)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(images: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], (images - shift) / scale
        for start, stop in SLICES:
            h = features[start:stop](h)
            out.append(h)
        return out

    x, y = _images(9), _images(10)
    with torch.no_grad():
        expected = torch.zeros(2)
        for k, (fx, fy) in enumerate(zip(taps(x), taps(y), strict=True)):
            nx = fx / (fx.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            ny = fy / (fy.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            expected += F.conv2d((nx - ny) ** 2, lins[f"lin{k}.model.1.weight"]).mean(dim=(1, 2, 3))
        actual = lpips(x, y)
    assert expected.min().item() > 1e-3
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_stays_frozen_and_in_eval_under_parent_train(lpips: LPIPS) -> None:
    parent = nn.ModuleDict({"lpips": lpips, "head": nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training
    assert not lpips.training
    assert not any(m.training for m in lpips.modules())
    assert not any(p.requires_grad for p in lpips.parameters())


def test_missing_vgg_file_names_path_and_source(tmp_path: Path, weight_files: dict[str, Path]) -> None:
    missing = tmp_path / "nowhere" / "vgg16.pth"
    with pytest.raises(FileNotFoundError) as info:
        LPIPS.from_weights(str(missing), str(weight_files["lin"]))
    message = str(info.value)
    assert str(missing) in message
    assert VGG_URL in message
    assert "perceptual_weight: 0" in message
    assert LPIPS_URL not in message  # the lpips file exists, so it is not reported


def test_missing_default_files_name_default_locations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        LPIPS.from_weights()
    message = str(info.value)
    assert str(tmp_path / "checkpoints" / "vgg16-397923af.pth") in message
    assert str(tmp_path / "checkpoints" / "lpips_vgg_v0.1.pth") in message
    assert VGG_URL in message and LPIPS_URL in message


def test_wrong_files_raise_clear_errors(tmp_path: Path, weight_files: dict[str, Path]) -> None:
    vgg = torch.load(weight_files["features"], weights_only=True)
    del vgg["features.28.weight"]
    bad_vgg = tmp_path / "bad_vgg.pth"
    torch.save(vgg, bad_vgg)
    with pytest.raises(ValueError, match="bad_vgg.pth"):
        LPIPS.from_weights(str(bad_vgg), str(weight_files["lin"]))

    lins = torch.load(weight_files["lin"], weights_only=True)
    lins["lin2.model.1.weight"] = torch.zeros(1, 128, 1, 1)
    bad_lin = tmp_path / "bad_lin.pth"
    torch.save(lins, bad_lin)
    with pytest.raises(ValueError, match="lin2.model.1.weight"):
        LPIPS.from_weights(str(weight_files["features"]), str(bad_lin))

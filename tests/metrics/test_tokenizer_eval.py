"""Tests for `metrics.tokenizer_eval`: a tokenizer's reconstruction PSNR, SSIM and rFID on a set of images,
measured with the domain classifier (`domain-classifier`) trained on the embedded digits (`digits_classifier`)
and on an ImageFolder tree of coloured shapes (`shapes_classifier`; both tests/metrics/conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from metrics import tokenizer_eval
from tokenizers_vq import VQModel, vq_config
from tokenizers_vq.checkpoint import save_vq
from train.data.digits import digits_split


def test_tokenizer_eval_psnr_ssim_rfid(digits_classifier: Path, tmp_path: Path) -> None:
    """A tokenizer that reconstructs perfectly scores PSNR 100 (capped), SSIM 1, rFID 0; a random one does not."""
    images, _ = digits_split("val")
    np.savez(tmp_path / "val.npz", arr_0=images)
    torch.manual_seed(0)
    save_vq(VQModel(vq_config("vq-tiny")), tmp_path / "vq")
    random_tok = tokenizer_eval.evaluate_tokenizer(str(tmp_path / "vq"), str(tmp_path / "val.npz"),
                                                   extractor="domain-classifier",
                                                   weights=str(digits_classifier.parent))
    m = random_tok["metrics"]
    assert m["psnr"] < 20 and m["ssim"] < 0.9 and m["rfid"] > 1 and random_tok["num_images"] == 297
    assert (tmp_path / "vq" / "eval_metrics.json").is_file()

    identity = lambda tokenizer, batch, device: batch  # noqa: E731 - a perfect tokenizer
    original = tokenizer_eval.reconstruct
    tokenizer_eval.reconstruct = identity
    try:
        perfect = tokenizer_eval.evaluate_tokenizer(str(tmp_path / "vq"), str(tmp_path / "val.npz"),
                                                    extractor="domain-classifier",
                                                    weights=str(digits_classifier.parent),
                                                    out=str(tmp_path / "perfect.json"))["metrics"]
    finally:
        tokenizer_eval.reconstruct = original
    assert perfect["ssim"] == pytest.approx(1.0, abs=1e-6) and abs(perfect["rfid"]) < 1e-6 and perfect["psnr"] > 60


def test_tokenizer_eval_on_a_shapes_folder(shapes: dict, shapes_classifier: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m metrics tokenizer --extractor domain-classifier` on an image folder: a random tokenizer's
    rFID is far above a perfect one's, and the report says which classifier (and data) measured it."""
    torch.manual_seed(0)
    save_vq(VQModel(vq_config("vq-tiny")), tmp_path / "vq")
    common = dict(extractor="domain-classifier", weights=str(shapes_classifier.parent))
    random_tok = tokenizer_eval.evaluate_tokenizer(str(tmp_path / "vq"), str(shapes["val"]), **common)
    assert random_tok["num_images"] == 48 and random_tok["images"]["kind"] == "folder"
    described = random_tok["extractor"]
    assert described["name"] == "domain-classifier"
    assert described["description"]["classes"] == ["cross", "disk", "square"]
    assert described["description"]["trained_on"]["path"] == str(Path(shapes["train"]).resolve())
    monkeypatch.setattr(tokenizer_eval, "reconstruct", lambda tokenizer, batch, device: batch)
    perfect = tokenizer_eval.evaluate_tokenizer(str(tmp_path / "vq"), str(shapes["val"]),
                                                out=str(tmp_path / "perfect.json"), **common)["metrics"]
    assert abs(perfect["rfid"]) < 1e-3 and random_tok["metrics"]["rfid"] > 1  # 48 images: float noise

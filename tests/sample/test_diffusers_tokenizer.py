"""A diffusers `VQModel` folder (`save_pretrained` output, weights in `diffusion_pytorch_model.safetensors`)
as the tokenizer of `python -m sample` (through its command line, hashed in the manifest) and of
`python -m metrics tokenizer` (reconstructions scored, the weights' hash recorded)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engram_vision.checkpoint import save_gpt
from sample.__main__ import main as sample_main
from tokenizers_vq.diffusers_backend import tokenizer_weights_file
from tokenizers_vq.files import file_sha256

diffusers = pytest.importorskip("diffusers")

VOCAB = 64  # gpt-tiny's vocab_size: the diffusers codebook must match it


def _tiny_diffusers_vq() -> diffusers.VQModel:
    torch.manual_seed(0)
    model = diffusers.VQModel(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                              up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                              vq_embed_dim=4, num_vq_embeddings=VOCAB, norm_num_groups=4, sample_size=8).eval()
    with torch.no_grad():  # spread the codebook so decoded codes differ visibly
        model.quantize.embedding.weight.normal_()
    return model


@pytest.fixture(scope="module")
def weights(random_model, tiny_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    save_gpt(random_model(tiny_config()), root / "gpt")
    _tiny_diffusers_vq().save_pretrained(root / "diffusers_vq")
    return root


def test_sampling_command_accepts_a_diffusers_vqmodel_folder(weights, tmp_path, one_thread):
    tokenizer = weights / "diffusers_vq"
    assert (tokenizer / "diffusion_pytorch_model.safetensors").is_file()
    assert not (tokenizer / "model.safetensors").exists()
    out = tmp_path / "run"
    manifest = sample_main(["--model", str(weights / "gpt"), "--tokenizer", str(tokenizer), "--out", str(out),
                            "--num_samples", "3", "--batch_size", "2", "--accelerator", "cpu", "--devices", "1"])
    # gpt-tiny's 4x4 grid decoded by a tokenizer of downsample factor 2: 8x8 images
    samples = np.load(out / "samples.npz", allow_pickle=False)
    assert samples["arr_0"].shape == (3, 8, 8, 3) and samples["labels"].shape == (3,)
    assert samples["arr_0"].std() > 0
    expected = file_sha256(tokenizer / "diffusion_pytorch_model.safetensors")
    assert manifest["tokenizer_sha256"] == expected and manifest["complete"]
    assert json.loads((out / "manifest.json").read_text())["tokenizer_sha256"] == expected


def test_tokenizer_weights_file_names_what_it_looked_for(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as info:
        tokenizer_weights_file(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "diffusion_pytorch_model.safetensors" in message
    assert "model.safetensors" in message
    pt = tmp_path / "vq.pt"
    pt.write_bytes(b"x")
    assert tokenizer_weights_file(pt) == pt


def test_tokenizer_evaluation_accepts_a_diffusers_vqmodel_folder(weights, tmp_path, fake_extractor, one_thread):
    from metrics.tokenizer_eval import evaluate_tokenizer

    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "val.npz", arr_0=images)
    tokenizer = weights / "diffusers_vq"
    report = evaluate_tokenizer(str(tokenizer), str(tmp_path / "val.npz"), extractor="fake-test",
                                out=str(tmp_path / "eval.json"))
    assert report["num_images"] == 4 and report["metrics"]["rfid"] >= 0
    assert 0 < report["metrics"]["psnr"] < 100
    assert report["tokenizer"]["sha256"] == file_sha256(tokenizer / "diffusion_pytorch_model.safetensors")

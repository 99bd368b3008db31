"""Tests of the diffusers VQModel backend against a tiny random VQModel saved to a temporary directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, VQModel

from tokenizers_vq.diffusers_backend import DiffusersVQTokenizer

CODEBOOK = 32


def tiny_vq(**overrides) -> VQModel:
    torch.manual_seed(0)
    kwargs = dict(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        vq_embed_dim=4,
        num_vq_embeddings=CODEBOOK,
        norm_num_groups=8,
        sample_size=16,
    )
    kwargs.update(overrides)
    model = VQModel(**kwargs).eval()
    # The default init spreads the codebook in +-1/n_e, so nearly every latent would pick one code; a
    # wider codebook makes the argmin test meaningful.
    with torch.no_grad():
        model.quantize.embedding.weight.normal_()
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[VQModel, Path]:
    model = tiny_vq()
    path = tmp_path_factory.mktemp("vq")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_properties_and_frozen(saved):
    _, path = saved
    tok = DiffusersVQTokenizer.from_pretrained(path)
    assert tok.codebook_size == CODEBOOK
    assert tok.downsample_factor == 2
    assert not tok.model.training
    assert not any(p.requires_grad for p in tok.parameters())
    tok.train()  # a parent switching to train mode leaves the tokenizer in eval
    assert not tok.model.training


def test_encode_matches_diffusers_argmin(saved, images):
    model, path = saved
    tok = DiffusersVQTokenizer.from_pretrained(path)
    codes = tok.encode(images)
    assert codes.shape == (3, 8, 8)
    assert codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < CODEBOOK
    assert codes.unique().numel() > 1
    with torch.no_grad():
        latents = model.encode(images).latents  # [B,C,h,w] after quant_conv
        z = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        # Exact squared distances, independent of cdist's matmul shortcut.
        dist = ((z[:, None, :] - model.quantize.embedding.weight[None]) ** 2).sum(-1)
        expected = dist.argmin(1).reshape(3, 8, 8)
        _, _, (_, _, diffusers_ids) = model.quantize(latents)
    assert torch.equal(codes, diffusers_ids.reshape(3, 8, 8))
    assert torch.equal(codes, expected)


def test_decode_matches_diffusers(saved, images):
    model, path = saved
    tok = DiffusersVQTokenizer.from_pretrained(path)
    codes = tok.encode(images)
    out = tok.decode(codes)
    assert out.shape == images.shape
    assert out.dtype == torch.float32
    with torch.no_grad():
        # diffusers' own path: decode() re-quantises the continuous latents internally.
        reference = model.decode(model.encode(images).latents).sample
    torch.testing.assert_close(out, reference.clamp(-1, 1), atol=1e-5, rtol=0)
    assert out.abs().max() <= 1.0


def test_decode_with_lookup_from_codebook(tmp_path, images):
    model = tiny_vq(lookup_from_codebook=True)
    model.save_pretrained(tmp_path)
    tok = DiffusersVQTokenizer.from_pretrained(tmp_path)
    with torch.no_grad():
        reference = model.decode(model.encode(images).latents).sample.clamp(-1, 1)
    torch.testing.assert_close(tok.decode(tok.encode(images)), reference, atol=1e-5, rtol=0)


def test_reencode_is_stable_in_shape(saved, images):
    tok = DiffusersVQTokenizer.from_pretrained(saved[1])
    codes = tok.encode(images)
    again = tok.encode(tok.decode(codes))
    assert again.shape == codes.shape and again.dtype == torch.int64
    assert tok.decode(again).shape == images.shape


def test_subfolder(tmp_path, saved):
    saved[0].save_pretrained(tmp_path / "vqvae")
    tok = DiffusersVQTokenizer.from_pretrained(tmp_path, subfolder="vqvae")
    assert tok.codebook_size == CODEBOOK


def test_missing_directory_names_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        DiffusersVQTokenizer.from_pretrained(missing)


def test_missing_config_names_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        DiffusersVQTokenizer.from_pretrained(tmp_path)


def test_not_a_vqmodel(tmp_path):
    AutoencoderKL(block_out_channels=(32,), norm_num_groups=8, latent_channels=4).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    with pytest.raises(ValueError, match="VQModel"):
        DiffusersVQTokenizer.from_pretrained(tmp_path)


def test_bad_inputs(saved):
    tok = DiffusersVQTokenizer.from_pretrained(saved[1])
    with pytest.raises(ValueError, match="divisible"):
        tok.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        tok.decode(torch.full((1, 2, 2), CODEBOOK))

"""VQModel: LlamaGen reference vectors, key/shape table, code ranges, straight-through gradients, losses."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tokenizers_vq import VQConfig, VQModel, vq_config
from tokenizers_vq.quantizer import codebook_stats, entropy_loss


def _reference_model(reference_dir) -> tuple[VQModel, dict]:
    expected = torch.load(reference_dir / "vq_tiny_expected.pt", weights_only=True)
    c = expected["config"]
    config = VQConfig(codebook_size=c["codebook_size"], codebook_embed_dim=c["codebook_embed_dim"],
                      codebook_l2_norm=c["codebook_l2_norm"], base_channels=c["base_channels"],
                      encoder_ch_mult=tuple(c["ch_mult"]), decoder_ch_mult=tuple(c["ch_mult"]),
                      z_channels=c["z_channels"], num_res_blocks=c["num_res_blocks"])
    model = VQModel(config).eval()
    state = torch.load(reference_dir / "vq_tiny.pt", weights_only=True)["model"]
    model.load_state_dict(state, strict=True)
    return model, expected


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_llamagen_vq_tiny_vectors(reference_dir):
    model, expected = _reference_model(reference_dir)
    with torch.no_grad():
        pre = model.pre_quant(expected["images"])
        quantized = model.quantize(pre, with_losses=False)
        reconstruction = model.decode(expected["codes"])
    assert _rel_err(pre, expected["pre_quant"]) < 1e-5
    assert torch.equal(quantized.codes, expected["codes"])
    assert torch.equal(model.encode(expected["images"]), expected["codes"])
    assert _rel_err(quantized.quant, expected["quant"]) < 1e-5
    assert _rel_err(reconstruction, expected["reconstruction"]) < 1e-5


@pytest.mark.parametrize(("reference_name", "size"), [("VQ-16", "vq-16"), ("VQ-8", "vq-8")])
def test_llamagen_key_shape_table(reference_dir, reference_name, size):
    table = json.loads((reference_dir / "llamagen_state_dict_shapes.json").read_text())[reference_name]
    with torch.device("meta"):
        model = VQModel(vq_config(size))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == table


def test_codes_in_range_and_round_trip_shapes():
    model = VQModel(vq_config("vq-tiny")).eval()
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    codes = model.encode(images)
    assert codes.shape == (3, 4, 4) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < model.codebook_size
    decoded = model.decode(codes)
    assert decoded.shape == images.shape
    # Decoding is a pure function of the codes: re-decoding the same codes gives the same pixels.
    assert torch.equal(model.decode(codes), decoded)


def test_bad_inputs_name_the_problem():
    model = VQModel(vq_config("vq-tiny")).eval()
    with pytest.raises(ValueError, match="codes must lie in"):
        model.decode(torch.full((1, 4, 4), 64))
    with pytest.raises(ValueError, match="not divisible"):
        model.encode(torch.zeros(1, 3, 18, 18))
    with pytest.raises(ValueError, match="norm_groups"):
        VQConfig(base_channels=48)
    with pytest.raises(ValueError, match="unknown VQ size"):
        vq_config("vq-99")


def test_straight_through_gradient_reaches_encoder():
    model = VQModel(vq_config("vq-tiny"))
    out = model(torch.rand(2, 3, 16, 16) * 2 - 1)
    out.reconstructions.square().mean().backward()
    # Decoder loss must reach the encoder through the non-differentiable argmin.
    assert model.encoder.conv_in.weight.grad is not None
    assert float(model.encoder.conv_in.weight.grad.abs().sum()) > 0
    # Reconstruction alone gives the codebook no gradient; the VQ loss does.
    assert model.quantize.embedding.weight.grad is None or float(model.quantize.embedding.weight.grad.abs().sum()) == 0
    model.zero_grad()
    model(torch.rand(2, 3, 16, 16)).quantized.vq_loss.backward()
    assert float(model.quantize.embedding.weight.grad.abs().sum()) > 0


def test_quantizer_losses_on_known_inputs():
    model = VQModel(vq_config("vq-tiny", commit_loss_beta=0.25))
    quantizer = model.quantize
    latents = torch.randn(2, 8, 4, 4)
    out = quantizer(latents)
    z = torch.nn.functional.normalize(latents.permute(0, 2, 3, 1).reshape(-1, 8), dim=-1)
    z_q = quantizer.codebook()[out.codes.reshape(-1)]
    mse = float((z_q - z).pow(2).mean().detach())
    assert out.vq_loss.item() == pytest.approx(mse, rel=1e-5)
    assert out.commit_loss.item() == pytest.approx(0.25 * mse, rel=1e-5)
    assert out.entropy_loss.item() == 0.0
    # Brute force nearest code by cosine similarity agrees with the expanded-square distance.
    assert torch.equal(out.codes.reshape(-1), (z @ quantizer.codebook().t()).argmax(dim=1))


def test_entropy_loss_known_values():
    k = 16
    confident_diverse = torch.eye(k) * 100.0  # each sample sure of a different code
    assert entropy_loss(confident_diverse, temperature=1.0).item() == pytest.approx(-math.log(k), abs=1e-2)
    uniform = torch.zeros(8, k)  # every sample unsure: sample entropy = batch entropy
    assert entropy_loss(uniform, temperature=1.0).item() == pytest.approx(0.0, abs=1e-3)


def test_codebook_stats_and_usage_ring_buffer():
    usage, perplexity = codebook_stats(torch.tensor([5.0, 5.0, 0.0, 0.0]))
    assert usage == 0.5 and perplexity == pytest.approx(2.0)
    quantizer = VQModel(vq_config("vq-tiny", usage_window=8)).quantize
    assert quantizer.recent_usage() == 0.0
    quantizer.record_usage(torch.tensor([1, 2, 3]))
    assert quantizer.recent_usage() == pytest.approx(3 / 64)
    quantizer.record_usage(torch.arange(10, 20))  # overflows the window of 8: only 12..19 remain
    assert quantizer.recent_usage() == pytest.approx(8 / 64)
    assert quantizer.codebook_used.tolist() == [float(i) for i in range(12, 20)]

"""Tokenizer weights on disk: safe LlamaGen loading, our safetensors round trip, dispatch, bad files."""

from __future__ import annotations

import argparse
import pickle

import pytest
import torch

from tokenizers_vq import VQModel, vq_config
from tokenizers_vq.checkpoint import load_llamagen_vq, load_tokenizer, load_vq, save_vq
from tokenizers_vq.files import safe_torch_load


class NotAllowed:
    """A class the safe loader must refuse to unpickle."""


def _tiny() -> VQModel:
    return VQModel(vq_config("vq-tiny")).eval()


def test_llamagen_file_with_namespace_loads_strictly(tmp_path):
    model = _tiny()
    path = tmp_path / "vq_ds4.pt"
    torch.save({"model": model.state_dict(), "steps": 10, "args": argparse.Namespace(lr=1e-4, vq_model="VQ-16")},
               path)
    loaded = load_llamagen_vq(path, "vq-tiny")
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(loaded.encode(images), model.encode(images))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_llamagen_reference_file_loads(reference_dir):
    from tokenizers_vq import VQConfig

    config = VQConfig(codebook_size=64, base_channels=32, encoder_ch_mult=(1, 1, 2), decoder_ch_mult=(1, 1, 2),
                      z_channels=32)
    model = load_llamagen_vq(reference_dir / "vq_tiny.pt", config)
    expected = torch.load(reference_dir / "vq_tiny_expected.pt", weights_only=True)
    assert torch.equal(model.encode(expected["images"]), expected["codes"])


def test_untrusted_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": NotAllowed()}, path)
    with pytest.raises(pickle.UnpicklingError):
        safe_torch_load(path)


def test_wrong_checkpoint_names_the_mismatch(tmp_path):
    path = tmp_path / "vq.pt"
    torch.save({"model": _tiny().state_dict()}, path)
    with pytest.raises(ValueError, match="does not fit") as err:
        load_llamagen_vq(path, "vq-small")
    assert "wrong shape" in str(err.value)
    with pytest.raises(ValueError, match="no 'ema' entry"):
        load_llamagen_vq(path, "vq-tiny", key="ema")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_llamagen_vq(tmp_path / "missing.pt", "vq-tiny")


def test_safetensors_round_trip_and_dispatch(tmp_path):
    model = _tiny()
    weights = save_vq(model, tmp_path / "tok")
    assert weights.name == "model.safetensors"
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_vq(tmp_path / "tok")
    assert loaded.config == model.config
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(loaded.encode(images), model.encode(images))
    assert isinstance(load_tokenizer(tmp_path / "tok"), VQModel)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vq(tmp_path)


@pytest.mark.parametrize("load", [lambda p: load_llamagen_vq(p, "vq-16"), lambda p: load_tokenizer(p)],
                         ids=["load_llamagen_vq", "load_tokenizer"])
def test_missing_llamagen_file_says_where_to_get_it_and_which_flag_takes_it(load, tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load(tmp_path / "vq_ds16_c2i.pt")
    message = str(error.value)
    assert str(tmp_path / "vq_ds16_c2i.pt") in message
    for needed in ("Hugging Face hub", "FoundationVision/LlamaGen", "vq_ds16_c2i.pt for vq-16", "--tokenizer",
                   "--tokenizer_size"):
        assert needed in message, needed


def test_saved_folder_records_the_weights_and_config_inside_them(tmp_path):
    import json

    from safetensors import safe_open

    from tokenizers_vq.files import file_sha256
    from tokenizers_vq.model_dir import MODEL_META_KEY

    save_vq(_tiny(), tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["weights_sha256"] == file_sha256(tmp_path / "model.safetensors")
    assert meta["weights_bytes"] == (tmp_path / "model.safetensors").stat().st_size
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        assert json.loads(handle.metadata()[MODEL_META_KEY]) == {"kind": meta["kind"], "config": meta["config"]}

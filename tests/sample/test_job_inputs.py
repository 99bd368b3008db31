"""`python -m sample` checks its inputs before the manifest or any image is written (counts, the label
scheme, missing paths, an --out that is a file, guidance without a null label), and a rerun samples again
the PNGs a damaged folder holds: empty and cut ones by itself, one damaged inside once the assembly step
has named it and it was deleted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engram_vision.checkpoint import save_gpt
from sample import job as sample_job
from sample.job import image_path
from tokenizers_vq import VQModel, vq_config
from tokenizers_vq.checkpoint import save_vq


@pytest.fixture(scope="module")
def weights(random_model, tiny_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    save_gpt(random_model(tiny_config()), root / "gpt")
    save_gpt(random_model(tiny_config(class_dropout_prob=0.0)), root / "gpt_no_null")
    torch.manual_seed(0)
    save_vq(VQModel(vq_config("vq-tiny")), root / "vq")
    return root


def _run(weights, out, **kw):
    args = dict(model=str(weights / "gpt"), tokenizer=str(weights / "vq"), out=str(out), num_samples=6,
                batch_size=2, seed=3, accelerator="cpu", devices=1)
    return sample_job.sample_images(**(args | kw))


@pytest.mark.parametrize(("overrides", "error", "words"), [
    ({"num_samples": 0}, ValueError, ["--num_samples must be an integer >= 1, got 0"]),
    ({"batch_size": -1}, ValueError, ["--batch_size must be an integer >= 1, got -1"]),
    ({"labels": "random"}, ValueError, ["--labels must be one of ['uniform', 'balanced'], got 'random'"]),
    ({"tokenizer": "MISSING"}, FileNotFoundError, ["--tokenizer", "missing does not exist",
                                                   "diffusers VQModel folder"]),
    ({"model": "MISSING"}, FileNotFoundError, ["--model", "missing does not exist"]),
    ({"model": "NO_NULL", "sampling": sample_job.SamplingConfig(cfg_scale=2.0)}, ValueError,
     ["--sampling.cfg_scale=2.0 needs the model's null label", "class_dropout_prob = 0", "--sampling.cfg_scale 1"]),
])
def test_bad_arguments_fail_before_anything_is_written(weights, tmp_path, overrides, error, words, one_thread):
    for key in ("model", "tokenizer"):
        if overrides.get(key) == "MISSING":
            overrides = {**overrides, key: str(tmp_path / "missing")}
    if overrides.get("model") == "NO_NULL":
        overrides = {**overrides, "model": str(weights / "gpt_no_null")}
    with pytest.raises(error) as info:
        _run(weights, tmp_path / "out", **overrides)
    for word in words:
        assert word in str(info.value), str(info.value)
    assert not (tmp_path / "out").exists()  # no manifest, no image


def test_an_out_that_is_a_file_is_refused(weights, tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        _run(weights, tmp_path / "out")


def test_empty_and_cut_pngs_are_sampled_again_by_the_rerun(weights, tmp_path, monkeypatch, one_thread):
    out = tmp_path / "run"
    _run(weights, out)
    reference = np.load(out / "samples.npz", allow_pickle=False)["arr_0"]
    image_path(out, 1).write_bytes(b"")  # a zero-size file (e.g. a copy that failed)
    whole = image_path(out, 4).read_bytes()
    image_path(out, 4).write_bytes(whole[: len(whole) // 2])  # cut short
    calls = []
    original = sample_job._Sampler.predict_step

    def counting(self, batch, batch_idx):
        calls.append(int(batch))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(sample_job._Sampler, "predict_step", counting)
    _run(weights, out)
    assert calls == [0, 2]  # only the two batches holding the damaged images ran again
    assert image_path(out, 4).read_bytes() == whole
    assert np.array_equal(np.load(out / "samples.npz", allow_pickle=False)["arr_0"], reference)


def test_a_png_damaged_inside_is_named_at_assembly_then_sampled_again(weights, tmp_path, one_thread):
    out = tmp_path / "run"
    _run(weights, out)
    reference = np.load(out / "samples.npz", allow_pickle=False)["arr_0"]
    path = image_path(out, 2)
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # the header chunk destroyed; the file still ends with IEND
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError) as info:
        _run(weights, out)
    message = str(info.value)
    assert str(path) in message and "delete them and rerun the same `python -m sample` command" in message
    path.unlink()
    _run(weights, out)
    assert np.array_equal(np.load(out / "samples.npz", allow_pickle=False)["arr_0"], reference)

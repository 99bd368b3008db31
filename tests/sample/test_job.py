"""`python -m sample`: exact image count, resumable after an interruption with identical images, the
ADM npz layout, manifest provenance, label schemes, and refusal to mix settings in one folder or to decode
with a tokenizer of another codebook."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engram_vision.checkpoint import save_gpt
from sample import job as sample_job
from sample.__main__ import main as sample_main
from sample.job import SamplePlan, plan_labels
from tokenizers_vq import VQModel, vq_config
from tokenizers_vq.checkpoint import save_vq


@pytest.fixture(scope="module")
def weights(random_model, tiny_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    save_gpt(random_model(tiny_config()), root / "gpt")
    torch.manual_seed(0)
    save_vq(VQModel(vq_config("vq-tiny")), root / "vq")  # codebook 64 = the model's vocab; 4x4 -> 16x16
    return root


def _run(weights, out, **kw):
    args = dict(model=str(weights / "gpt"), tokenizer=str(weights / "vq"), out=str(out), num_samples=10,
                batch_size=4, seed=3, accelerator="cpu", devices=1)
    return sample_job.sample_images(**(args | kw))


def test_interrupted_run_resumes_to_exactly_the_same_images(weights, tmp_path, monkeypatch):
    manifest = _run(weights, tmp_path / "full")
    reference = np.load(tmp_path / "full" / "samples.npz", allow_pickle=False)
    assert reference["arr_0"].shape == (10, 16, 16, 3) and reference["arr_0"].dtype == np.uint8
    assert reference["labels"].dtype == np.int64 and reference["labels"].shape == (10,)
    for key in ("model_sha256", "tokenizer_sha256", "sampling", "seed", "label_scheme", "num_samples"):
        assert key in manifest
    assert manifest["complete"] and json.loads((tmp_path / "full" / "manifest.json").read_text()) == manifest

    original = sample_job._Sampler.predict_step
    calls = []

    def crash_after_one(self, batch, batch_idx):
        if calls:
            raise RuntimeError("simulated interruption")
        calls.append(batch)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(sample_job._Sampler, "predict_step", crash_after_one)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        _run(weights, tmp_path / "resumed")
    assert len(list((tmp_path / "resumed" / "images").glob("*.png"))) == 4  # one batch of 4 finished
    monkeypatch.setattr(sample_job._Sampler, "predict_step", original)
    _run(weights, tmp_path / "resumed")
    resumed = np.load(tmp_path / "resumed" / "samples.npz", allow_pickle=False)
    names = sorted(p.name for p in (tmp_path / "resumed" / "images").iterdir())
    assert names == [f"{i:06d}.png" for i in range(10)]  # exactly N, unique indices, no temp files
    assert np.array_equal(resumed["arr_0"], reference["arr_0"])
    assert np.array_equal(resumed["labels"], reference["labels"])


def test_other_settings_in_the_same_folder_are_refused(weights, tmp_path):
    _run(weights, tmp_path, num_samples=4)
    with pytest.raises(ValueError, match="seed"):
        _run(weights, tmp_path, num_samples=4, seed=4)


def test_label_schemes_and_plan():
    balanced = plan_labels(1000, 10, "balanced", seed=0)
    assert torch.bincount(balanced).tolist() == [100] * 10
    uniform = plan_labels(1000, 10, "uniform", seed=0)
    assert torch.equal(uniform, plan_labels(1000, 10, "uniform", seed=0)) and int(uniform.max()) == 9
    plan = SamplePlan(num_samples=10, batch_size=4)
    assert plan.num_batches == 3 and list(plan.indices(2)) == [8, 9]
    with pytest.raises(ValueError, match="label scheme"):
        plan_labels(10, 10, "random", seed=0)


def test_cli_reads_a_config_file(weights, tmp_path):
    config = tmp_path / "sample.yaml"
    config.write_text(f"model: {weights / 'gpt'}\ntokenizer: {weights / 'vq'}\nout: {tmp_path / 'run'}\n"
                      "num_samples: 3\nbatch_size: 2\naccelerator: cpu\ndevices: 1\n"
                      "sampling: {cfg_scale: 2.0, top_k: 10}\n")
    manifest = sample_main(["--config", str(config)])
    assert manifest["sampling"]["cfg_scale"] == 2.0 and manifest["num_samples"] == 3


def test_two_process_ddp_run_equals_one_process(weights, tmp_path):
    """Batches dealt to 2 gloo ranks give the same images as one process (same threads: float rounding
    of matmuls depends on the thread count, so both runs use one)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    common = [sys.executable, "-m", "sample", "--model", str(weights / "gpt"), "--tokenizer", str(weights / "vq"),
              "--num_samples", "10", "--batch_size", "4", "--accelerator", "cpu"]
    for name, extra in (("one", ["--devices", "1"]), ("two", ["--devices", "2", "--strategy", "ddp"])):
        done = subprocess.run([*common, "--out", str(tmp_path / name), *extra], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    one = np.load(tmp_path / "one" / "samples.npz", allow_pickle=False)
    two = np.load(tmp_path / "two" / "samples.npz", allow_pickle=False)
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["labels"], two["labels"])
    assert len(list((tmp_path / "two" / "images").glob("*.png"))) == 10


def test_a_tokenizer_of_another_codebook_is_refused_before_sampling(weights, tmp_path):
    save_vq(VQModel(vq_config("vq-tiny", codebook_size=32)), tmp_path / "vq32")
    with pytest.raises(ValueError) as info:
        _run(weights, tmp_path / "out", tokenizer=str(tmp_path / "vq32"))
    message = str(info.value)
    assert f"--tokenizer {tmp_path / 'vq32'} has a codebook of 32 codes" in message, message
    assert f"--model {weights / 'gpt'} predicts vocab_size=64" in message, message
    assert not (tmp_path / "out").exists()  # no manifest, no image

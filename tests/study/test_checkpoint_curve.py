"""The checkpoint curve (`study.checkpoint_curve.curve`): a tiny LitAR trained for 6 steps with a checkpoint
every 2 (plus last.ckpt), scored in two calls (two checkpoints, then the whole run), then a rerun through the
command line that must do no work; settings changes and bad inputs are refused before any work.

The tokenizer is a random vq-tiny, the token shards random codes, the extractor the fake one: the numbers
mean nothing except the NLL, which is checked against a computation from the checkpoint weights.
"""

from __future__ import annotations

import importlib
import json
import math
import pickle
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jsonargparse import auto_cli
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from engram_vision.config import ModelConfig
from engram_vision.model import EngramGPT
from metrics.evaluate import EvaluateConfig
from study.checkpoint_curve import CurveNll, CurveSample, curve, read_checkpoints
from tokenizers_vq import VQModel, vq_config
from tokenizers_vq.checkpoint import save_vq
from tokenizers_vq.files import file_sha256
from train.data.tokens import TokenShardsDataModule
from train.lit_ar import LitAR

GPT = ModelConfig(dim=32, n_layer=2, n_head=2, multiple_of=32, vocab_size=64, num_classes=10, block_size=16)
NUM_IMAGES = 30


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, token_shards, one_thread) -> dict:
    root = tmp_path_factory.mktemp("curve")
    torch.manual_seed(0)
    save_vq(VQModel(vq_config("vq-tiny")), root / "tokenizer")
    rng = np.random.default_rng(0)
    # Codes that depend on the label, so a few steps of training move the NLL.
    labels = [i % 10 for i in range(NUM_IMAGES)]
    codes = [np.where(rng.random((1, 4, 4)) < 0.6, 6 * label, rng.integers(0, 64, (1, 4, 4))) for label in labels]
    token_shards(root / "tokens", codes, labels, codebook=64, num_classes=10, grid=(4, 4))
    run = root / "run"
    checkpoint = ModelCheckpoint(dirpath=run / "checkpoints", filename="step_{step:07d}", auto_insert_metric_name=False,
                                 every_n_train_steps=2, save_top_k=-1, save_last=True)
    L.seed_everything(0)
    trainer = L.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[checkpoint])
    data = TokenShardsDataModule(str(root / "tokens"), batch_size=8, num_workers=0, batches_per_epoch=2)
    trainer.fit(LitAR(GPT, lr=1e-2), data)
    reference = rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
    np.savez(root / "reference.npz", arr_0=reference)
    return {"root": root, "run": run, "tokenizer": root / "tokenizer", "tokens": root / "tokens",
            "reference": root / "reference.npz", "codes": np.stack([c[0].reshape(-1) for c in codes]),
            "labels": np.array(labels)}


def _evaluate(ws: dict, **overrides) -> EvaluateConfig:
    settings = {"reference": str(ws["reference"]), "extractor": "fake-test", "metrics": "fid,is,kid",
                "accelerator": "cpu", "cache_dir": str(ws["root"] / "cache"), "isc_splits": 2, "bootstrap": 10}
    return EvaluateConfig(**(settings | overrides))


def _kwargs(ws: dict, out: Path, **overrides) -> dict:
    kwargs = {"tokenizer": str(ws["tokenizer"]), "val_shards": str(ws["tokens"]), "num_samples": 12,
              "evaluate": _evaluate(ws), "out": str(out),
              "sample": CurveSample(seed=3, batch_size=6, accelerator="cpu"),
              "nll": CurveNll(bootstrap=200, accelerator="cpu")}
    return kwargs | overrides


def _ckpt(ws: dict, step: int) -> Path:
    return ws["run"] / "checkpoints" / f"step_{step:07d}.ckpt"


class Calls:
    """Counts the calls of the expensive parts (wrapping the real functions)."""

    def __init__(self, monkeypatch) -> None:
        self.counts = {"sample": 0, "evaluate": 0, "export": 0, "nll": 0}
        for name, target in (("sample", "sample.job.sample_images"), ("evaluate", "metrics.evaluate.evaluate"),
                             ("export", "engram_vision.checkpoint.save_gpt"),
                             ("nll", "engram_vision.probes.score_probes")):
            module, attr = target.rsplit(".", 1)
            real = getattr(importlib.import_module(module), attr)

            def counted(*args, _real=real, _name=name, **kwargs):
                self.counts[_name] += 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(target, counted)


@pytest.fixture(scope="module")
def scored(workspace, fake_extractor) -> dict:
    """Two calls into one curve folder: checkpoints 4 and 2 (given out of order), then the whole run."""
    out = workspace["root"] / "curve"
    with pytest.MonkeyPatch.context() as monkeypatch:
        calls = Calls(monkeypatch)
        curve(checkpoints=[str(_ckpt(workspace, 4)), str(_ckpt(workspace, 2))], **_kwargs(workspace, out))
        first = json.loads((out / "curve.json").read_text())
        first_counts = dict(calls.counts)
        path = curve(run=str(workspace["run"]), **_kwargs(workspace, out))
    return {"out": out, "path": path, "first": first, "first_counts": first_counts, "counts": calls.counts}


def _bits_per_token(checkpoint: Path, codes: np.ndarray, labels: np.ndarray) -> float:
    """Held-out bits per token straight from the checkpoint's weights: mean cross-entropy over every token."""
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = EngramGPT(ModelConfig(**payload["hyper_parameters"]["gpt"]))
    model.load_state_dict({k[len("model."):]: v for k, v in payload["state_dict"].items()})
    model.eval()
    tokens, classes = torch.from_numpy(codes).long(), torch.from_numpy(labels).long()
    with torch.no_grad():
        logits = model(tokens[:, :-1], classes)
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), tokens.reshape(-1))) / math.log(2)


def test_curve_has_one_entry_per_step_in_order(workspace, scored):
    out = scored["out"]
    assert [e["step"] for e in scored["first"]["steps"]] == [2, 4]
    assert scored["first_counts"] == {"sample": 2, "evaluate": 2, "export": 2, "nll": 2}
    # The second call scored only step 6 (last.ckpt is the same step and weights as step_0000006.ckpt).
    assert scored["counts"] == {"sample": 3, "evaluate": 3, "export": 3, "nll": 3}
    index = json.loads(scored["path"].read_text())
    assert index["format"] == "engram-vision-curve" and index["settings"]["num_samples"] == 12
    steps = index["steps"]
    assert [e["step"] for e in steps] == [2, 4, 6]
    nlls = []
    for entry in steps:
        checkpoint = _ckpt(workspace, entry["step"])
        assert entry["checkpoint"] == str(checkpoint.resolve())
        assert entry["checkpoint_sha256"] == file_sha256(checkpoint)
        expected = _bits_per_token(checkpoint, workspace["codes"], workspace["labels"])
        nll = entry["nll_bits"]
        assert nll["mean"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert nll["low"] <= nll["mean"] <= nll["high"] and nll["low"] < nll["high"] and nll["level"] == 0.95
        assert entry["nll_num_images"] == NUM_IMAGES and entry["num_samples"] == 12
        assert entry["fid"] > 0 and entry["is_mean"] > 0 and "kid_mean" in entry
        assert entry["intervals"]["fid"]["high"] >= entry["intervals"]["fid"]["low"]
        with np.load(out / entry["samples"]) as data:
            assert data["arr_0"].shape == (12, 16, 16, 3)
        manifest = json.loads((out / entry["samples"]).parent.joinpath("manifest.json").read_text())
        assert manifest["seed"] == 3 and manifest["model_sha256"] == entry["model_sha256"]
        nlls.append(nll["mean"])
    assert len(set(nlls)) == 3  # training moved the weights: three different points
    with Image.open(out / "curve.png") as figure:
        assert figure.format == "PNG" and figure.width > figure.height  # two panels side by side


def test_rerun_through_the_command_line_does_no_work(workspace, scored, monkeypatch):
    out = scored["out"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished step ran again")

    for target in ("sample.job.sample_images", "metrics.evaluate.evaluate", "engram_vision.checkpoint.save_gpt",
                   "engram_vision.probes.score_probes", "study.checkpoint_curve.curve_figure"):
        monkeypatch.setattr(target, must_not_run)
    args = ["curve", "--run", str(workspace["run"]), "--out", str(out), "--tokenizer", str(workspace["tokenizer"]),
            "--val_shards", str(workspace["tokens"]), "--num_samples", "12",
            "--evaluate.reference", str(workspace["reference"]), "--evaluate.extractor", "fake-test",
            "--evaluate.metrics", "fid,is,kid", "--evaluate.accelerator", "cpu", "--evaluate.isc_splits", "2",
            "--evaluate.bootstrap", "10", "--evaluate.cache_dir", str(workspace["root"] / "cache"),
            "--sample.seed", "3", "--sample.batch_size", "6", "--sample.accelerator", "cpu",
            "--nll.bootstrap", "200", "--nll.accelerator", "cpu"]
    assert auto_cli({"curve": curve}, args=args, as_positional=False) == out / "curve.json"
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_an_interrupted_step_redoes_only_its_missing_parts(workspace, scored, tmp_path, monkeypatch):
    """A copy of the curve whose step 4 stopped after sampling (no NLL, no metrics) and whose step 6 export
    was killed (a temporary folder, no model/): only those parts run again, to the same numbers."""
    out = tmp_path / "curve"
    shutil.copytree(scored["out"], out)
    for name in ("metrics.json", "nll.json", "samples/metrics.json"):
        (out / "step_0000004" / name).unlink()
    (out / "step_0000006" / "metrics.json").unlink()
    (out / "step_0000006" / "model").rename(out / "step_0000006" / ".model.killed.tmp")
    calls = Calls(monkeypatch)
    curve(run=str(workspace["run"]), **_kwargs(workspace, out))
    assert calls.counts == {"sample": 0, "evaluate": 1, "export": 1, "nll": 1}
    assert not list((out / "step_0000006").glob(".model.*"))
    assert (out / "step_0000006" / "model" / "model.safetensors").is_file()
    again, original = (json.loads((folder / "curve.json").read_text())["steps"] for folder in (out, scored["out"]))
    assert again == original  # the same NLL, FID and intervals (every resampling is seeded)


@pytest.mark.parametrize(("overrides", "named"), [
    ({"num_samples": 10}, "num_samples: 12 then, 10 now"),
    ({"sample": CurveSample(seed=4, batch_size=6, accelerator="cpu")}, "sample.seed: 3 then, 4 now"),
    ({"nll": CurveNll(bootstrap=200, images_per_class=1, accelerator="cpu")}, "nll.images_per_class"),
], ids=["num_samples", "seed", "nll_subset"])
def test_other_settings_are_refused_naming_them(workspace, scored, monkeypatch, overrides, named):
    monkeypatch.setattr("sample.job.sample_images", lambda *a, **k: pytest.fail("sampled before refusing"))
    with pytest.raises(ValueError, match="other settings") as error:
        curve(run=str(workspace["run"]), **_kwargs(workspace, scored["out"], **overrides))
    assert named in str(error.value) and "use a new --out folder" in str(error.value)
    # where a job runs is no setting: the evaluation device and the NLL batch may change
    curve(run=str(workspace["run"]), **_kwargs(workspace, scored["out"],
                                              nll=CurveNll(bootstrap=200, batch_size=7, accelerator="cpu")))


def test_a_step_folder_of_another_checkpoint_is_refused(workspace, scored, tmp_path):
    payload = torch.load(_ckpt(workspace, 2), map_location="cpu", weights_only=True)
    payload["state_dict"]["model.norm.weight"] = payload["state_dict"]["model.norm.weight"] + 1
    torch.save(payload, tmp_path / "retrained.ckpt")
    with pytest.raises(ValueError, match="belongs to another checkpoint at step 2"):
        curve(checkpoints=[str(tmp_path / "retrained.ckpt")], **_kwargs(workspace, scored["out"]))


def test_training_only_fields_may_differ_between_checkpoints(workspace, tmp_path):
    payload = torch.load(_ckpt(workspace, 4), map_location="cpu", weights_only=True)
    payload["hyper_parameters"]["gpt"] = {**payload["hyper_parameters"]["gpt"], "resid_dropout_p": 0.0}
    torch.save(payload, tmp_path / "finetuned.ckpt")
    points = read_checkpoints([_ckpt(workspace, 2), tmp_path / "finetuned.ckpt"])
    assert [p.step for p in points] == [2, 4]
    # last.ckpt and step_0000006.ckpt: the same step and weights, scored once under the step's name
    points = read_checkpoints(sorted((workspace["run"] / "checkpoints").glob("*.ckpt")))
    assert [p.path.name for p in points] == ["step_0000002.ckpt", "step_0000004.ckpt", "step_0000006.ckpt"]


class NotAllowed:
    """A class the weights-only unpickler refuses."""


def _bad_inputs(ws: dict, tmp: Path, token_shards) -> dict:
    """name -> (curve kwargs, expected error, message pattern), each built in `tmp`."""
    payload = torch.load(_ckpt(ws, 2), map_location="cpu", weights_only=True)
    other = {**payload, "hyper_parameters": {**payload["hyper_parameters"],
                                             "gpt": {**payload["hyper_parameters"]["gpt"], "dim": 64}}}
    torch.save(other, tmp / "wider.ckpt")
    branched = {**payload, "state_dict": {k: v + 1 if k == "model.norm.weight" else v
                                          for k, v in payload["state_dict"].items()}}
    (tmp / "branch").mkdir()
    torch.save(branched, tmp / "branch" / "step_0000002.ckpt")
    damaged = {**payload, "state_dict": {k: v for k, v in payload["state_dict"].items() if k != "model.norm.weight"}}
    torch.save(damaged, tmp / "damaged.ckpt")
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}, "hyper_parameters": {"vq": {}}, "global_step": 1},
               tmp / "tokenizer.ckpt")
    torch.save({"state_dict": NotAllowed()}, tmp / "pickle.ckpt")
    save_vq(VQModel(vq_config("vq-tiny", codebook_size=32)), tmp / "tok32")
    rng = np.random.default_rng(1)
    token_shards(tmp / "tokens16", [rng.integers(0, 16, (1, 4, 4)) for _ in range(10)], list(range(10)),
                 codebook=16, num_classes=10, grid=(4, 4))
    (tmp / "run_without").mkdir()
    step2 = [str(_ckpt(ws, 2))]
    return {
        "no_checkpoints": ({}, ValueError, "pass --run"),
        "run_without_checkpoints": ({"run": str(tmp / "run_without")}, FileNotFoundError, "no checkpoints/ folder"),
        "missing_checkpoint": ({"checkpoints": [str(tmp / "nope.ckpt")]}, FileNotFoundError, "does not exist"),
        "not_lit_ar": ({"checkpoints": [str(tmp / "tokenizer.ckpt")]}, ValueError, "not a Lightning checkpoint of LitAR"),
        "pickle": ({"checkpoints": [str(tmp / "pickle.ckpt")]}, pickle.UnpicklingError, "Weights only load failed"),
        "other_model": ({"checkpoints": [*step2, str(tmp / "wider.ckpt")]}, ValueError,
                        r"another model .*model\.gpt\.dim: 32 in .*, 64 in"),
        "branched": ({"checkpoints": [*step2, str(tmp / "branch" / "step_0000002.ckpt")]}, ValueError,
                     "both at global step 2 but hold different weights"),
        "damaged": ({"checkpoints": [str(tmp / "damaged.ckpt")]}, ValueError, "(?s)1 missing.*do not fit its own"),
        "missing_tokenizer": ({"checkpoints": step2, "tokenizer": str(tmp / "none")}, FileNotFoundError,
                              "--tokenizer .* does not exist"),
        "tokenizer_codebook": ({"checkpoints": step2, "tokenizer": str(tmp / "tok32")}, ValueError,
                               "codebook of 32 codes but the checkpoints .* vocab_size=64"),
        "missing_val_shards": ({"checkpoints": step2, "val_shards": str(tmp / "none")}, FileNotFoundError,
                               "no meta.json beside token shards"),
        "val_shards_vocab": ({"checkpoints": step2, "val_shards": str(tmp / "tokens16")}, ValueError,
                             "model.gpt.vocab_size=64 does not match the token data's vocab_size=16"),
        "missing_reference": ({"checkpoints": step2, "evaluate": _evaluate(ws, reference=str(tmp / "ref.npz"))},
                              FileNotFoundError, "reference .* does not exist"),
        "unknown_extractor": ({"checkpoints": step2, "evaluate": _evaluate(ws, extractor="nope")}, ValueError,
                              "not registered"),
        "evaluate_out_set": ({"checkpoints": step2, "evaluate": _evaluate(ws, out=str(tmp / "m.json"))}, ValueError,
                             "leave them unset"),
        "zero_samples": ({"checkpoints": step2, "num_samples": 0}, ValueError, "--num_samples"),
    }


BAD = ["no_checkpoints", "run_without_checkpoints", "missing_checkpoint", "not_lit_ar", "pickle", "other_model",
       "branched", "damaged", "missing_tokenizer", "tokenizer_codebook", "missing_val_shards", "val_shards_vocab",
       "missing_reference", "unknown_extractor", "evaluate_out_set", "zero_samples"]


def test_bad_inputs_fail_before_any_work(workspace, fake_extractor, token_shards, tmp_path, monkeypatch):
    cases = _bad_inputs(workspace, tmp_path, token_shards)
    assert sorted(cases) == sorted(BAD)
    monkeypatch.setattr("sample.job.sample_images", lambda *a, **k: pytest.fail("sampled before refusing"))
    monkeypatch.setattr("engram_vision.checkpoint.save_gpt", lambda *a, **k: pytest.fail("exported before refusing"))
    for name in BAD:
        overrides, error, pattern = cases[name]
        out = tmp_path / f"out_{name}"
        with pytest.raises(error, match=pattern):
            curve(**_kwargs(workspace, out, **overrides))
        assert not out.exists(), f"{name}: wrote into {out} before refusing"
    # A folder that is not a curve's (step folders without settings.json) is not written into either.
    foreign = tmp_path / "foreign"
    (foreign / "step_0000002").mkdir(parents=True)
    with pytest.raises(ValueError, match="no settings.json"):
        curve(checkpoints=[str(_ckpt(workspace, 2))], **_kwargs(workspace, foreign))
    assert sorted(p.name for p in foreign.iterdir()) == ["step_0000002"]
    shutil.rmtree(foreign)

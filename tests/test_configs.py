"""Every YAML under configs/ parses with the CLI that owns it and builds its model on the meta device."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
import pytest
import torch
import torchvision
import yaml
from lightning.pytorch.cli import LightningCLI

from tokenizers_vq.lpips import LPIPS_FILENAME, VGG_FILENAME
from train.cli import STAGES

REPO = Path(__file__).resolve().parents[1]
# configs/<folder>/ -> the train stage whose CLI reads it
STAGE_OF_FOLDER = {"vq": "tokenizer", "ar": "ar", "strategy": "ar", "sample": None, "study": None}
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
# Partial configs (a strategy) are checked on top of this full one.
BASE_OF_PARTIAL = {"strategy": REPO / "configs" / "ar" / "digits_baseline.yaml"}


class _ParseOnly(LightningCLI):
    """Parse and validate a config without instantiating anything (trainers may ask for GPUs)."""

    def instantiate_classes(self) -> None:
        pass


@pytest.fixture(scope="module")
def fake_lpips_hub(tmp_path_factory) -> Path:
    """A torch hub dir holding random LPIPS/VGG weights, so recipes with perceptual loss build offline."""
    hub = tmp_path_factory.mktemp("hub")
    (hub / "checkpoints").mkdir()
    features = torchvision.models.vgg16().features.state_dict()
    torch.save({f"features.{k}": v for k, v in features.items()}, hub / "checkpoints" / VGG_FILENAME)
    widths = [64, 128, 256, 512, 512]
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(widths)},
               hub / "checkpoints" / LPIPS_FILENAME)
    return hub


def _check_command_config(path: Path) -> None:
    from jsonargparse import ArgumentParser

    from engram_vision.probes import ProbeConfig
    from metrics.evaluate import EvaluateConfig
    from sample.job import sample_images
    from study.runner import study

    parser = ArgumentParser()
    parser.add_function_arguments(sample_images if path.parent.name == "sample" else study)
    parsed = parser.parse_path(str(path))
    if path.parent.name == "sample":
        assert parsed.num_samples >= 1 and parsed.sampling.cfg_scale >= 1.0
        return
    built = parser.instantiate(parsed)  # the dataclasses' own checks run here
    # Every run's training config and the sampling config exist and are themselves checked above.
    for run in built.runs:
        assert run.model is not None or (REPO / run.config).is_file(), run
    assert (REPO / built.sample.config).is_file() and built.baseline in [run.name for run in built.runs]
    # The probe and evaluation sections are the very configs run_probes and evaluate take.
    assert isinstance(built.probes.settings, ProbeConfig) and len(built.probes.settings.gates) >= 2
    assert isinstance(built.evaluate, EvaluateConfig) and built.evaluate.samples is None
    assert "accelerator" in yaml.safe_load(path.read_text())["probes"]


def test_there_are_configs():
    assert any(p.parent.name == "vq" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_parses_and_builds_on_meta(path, fake_lpips_hub, monkeypatch):
    if path.parent.name not in STAGE_OF_FOLDER:
        pytest.fail(f"{path} is in a configs/ folder no test knows; add it to STAGE_OF_FOLDER")
    stage = STAGE_OF_FOLDER[path.parent.name]
    if stage is None:  # a jsonargparse command (python -m sample / study run): parse against its function
        _check_command_config(path)
        return
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(fake_lpips_hub))
    base = BASE_OF_PARTIAL.get(path.parent.name)
    args = (["--config", str(base)] if base else []) + ["--config", str(path)]
    cli = _ParseOnly(STAGES[stage](), L.LightningDataModule, subclass_mode_data=True, run=False, args=args)
    with torch.device("meta"):
        built = cli.parser.instantiate_classes(cli.config)
    model = built["model"]
    # Every field the YAML sets reaches the built model's config.
    section = yaml.safe_load((base or path).read_text())["model"]
    for field, value in (section.get("tokenizer") or section.get("gpt") or {}).items():
        got = getattr(model.model.config, field)
        if field == "engram" and value is not None:
            got, value = got.layers, value["layers"]
        assert (list(got) if isinstance(got, tuple) else got) == value, field
    assert sum(p.numel() for p in model.model.parameters()) > 0
    assert isinstance(built["data"], L.LightningDataModule)


AR_CONFIGS = sorted((REPO / "configs" / "ar").glob("*.yaml"))


@pytest.mark.parametrize("path", AR_CONFIGS, ids=lambda p: p.stem)
def test_ar_config_counts_match_its_name(path):
    """gpt_b_* configs have GPT-B's parameter count (digits_* the digits baseline's) within 1%, `rhoX` has
    rho X, `plus_memoryXm` has the baseline's backbone plus X million memory parameters."""
    import re

    from engram_vision.budget import count_parameters
    from engram_vision.config import EngramConfig, ModelConfig

    def load(p):
        spec = yaml.safe_load(p.read_text())["model"]["gpt"]
        engram = spec.pop("engram")
        return ModelConfig(**spec, engram=EngramConfig(**engram) if engram else None)

    family = path.stem.split("_engram")[0].split("_plus")[0].removesuffix("_baseline")
    baseline = count_parameters(load(path.parent / f"{family}_baseline.yaml"))
    if family.startswith("gpt_b"):
        assert baseline.total == 110_888_448
    config = load(path)
    counts = count_parameters(config)
    if (plus := re.search(r"plus_memory([\d.]+)m", path.stem)) is not None:
        assert count_parameters(dataclasses.replace(config, engram=None)).total == baseline.total
        assert counts.memory == pytest.approx(float(plus.group(1)) * 1e6, rel=0.01)
        return
    assert counts.total == pytest.approx(baseline.total, rel=0.01)
    if (rho := re.search(r"rho([\d.]+)", path.stem)) is not None:
        assert counts.rho == pytest.approx(float(rho.group(1)), abs=0.01 if family.startswith("gpt_b") else 0.05)

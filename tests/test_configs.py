"""Every YAML under configs/ parses with the CLI that owns it and builds its model on the meta device."""

from __future__ import annotations

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
STAGE_OF_FOLDER = {"vq": "tokenizer"}
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


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


def test_there_are_configs():
    assert any(p.parent.name == "vq" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_parses_and_builds_on_meta(path, fake_lpips_hub, monkeypatch):
    stage = STAGE_OF_FOLDER.get(path.parent.name)
    if stage is None:
        pytest.fail(f"{path} is in a configs/ folder no test knows; add it to STAGE_OF_FOLDER")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(fake_lpips_hub))
    cli = _ParseOnly(STAGES[stage](), L.LightningDataModule, subclass_mode_data=True, run=False,
                     args=["--config", str(path)])
    with torch.device("meta"):
        built = cli.parser.instantiate_classes(cli.config)
    model = built["model"]
    # Every field the YAML sets reaches the built model's config.
    for field, value in yaml.safe_load(path.read_text())["model"].get("tokenizer", {}).items():
        got = getattr(model.model.config, field)
        assert (list(got) if isinstance(got, tuple) else got) == value, field
    assert sum(p.numel() for p in model.model.parameters()) > 0
    assert isinstance(built["data"], L.LightningDataModule)

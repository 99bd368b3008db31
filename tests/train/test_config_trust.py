"""A training config that names code outside the project, Lightning and torch is refused before anything
is imported (YAML files, inline YAML and plain flags alike); `--allow_class_path` lets a package in."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from train.cli import run_stage
from train.config_trust import check_class_paths, split_allow_flags, untrusted_names


@pytest.fixture
def evil_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An importable package whose import leaves a marker file: proof of whether its code ran."""
    marker = tmp_path / "imported.txt"
    package = tmp_path / "site" / "labdata"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "import lightning as L\nclass Data(L.LightningDataModule):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield marker
    sys.modules.pop("labdata", None)


def test_a_yaml_class_path_outside_the_project_is_refused_before_its_code_runs(tmp_path: Path, evil_package: Path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"data": {"class_path": "labdata.Data"}}))
    with pytest.raises(SystemExit, match=r"labdata\.Data \(in .*run\.yaml\).*--allow_class_path labdata"):
        run_stage("ar", ["fit", "--config", str(config)])
    assert not evil_package.exists()


@pytest.mark.parametrize("args", [
    ["--data", "{class_path: labdata.Data, init_args: {}}"],  # inline YAML
    ["--data.class_path=labdata.Data"],
    ["--trainer.callbacks+=labdata.Data"],
    ["--trainer.callbacks+=LambdaCallback", "--trainer.callbacks.on_fit_start=os.system"],
])
def test_command_line_forms_are_refused_too(args: list[str], evil_package: Path):
    with pytest.raises(SystemExit, match="refusing to import code"):
        run_stage("ar", ["fit", *args])
    assert not evil_package.exists()


def test_lambda_callback_and_callables_are_named_and_trusted_names_pass(tmp_path: Path):
    config = tmp_path / "cb.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "lightning.pytorch.callbacks.LambdaCallback", "init_args": {"on_fit_start": "os.system"}},
        {"class_path": "train.callbacks.MetricsJson"},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"filename": "best.ckpt"}}]}}))
    found = [name for _, name in untrusted_names(["fit", "--config", str(config)], [])]
    assert found == ["lightning.pytorch.callbacks.LambdaCallback", "os.system"]
    assert untrusted_names(["fit", "--model.lr=1e-3", "--trainer.precision", "bf16-mixed",
                            "--data.init_args.train_shards=runs/demo/tokens/train", "--tokenizer", "vq_ds16_c2i.pt"],
                           []) == []


def test_allow_class_path_lets_a_package_in_and_is_removed_from_the_arguments(tmp_path: Path):
    args, allowed = split_allow_flags(["fit", "--allow_class_path", "labdata", "--data.class_path=labdata.Data",
                                       "--allow_class_path=os"])
    assert args == ["fit", "--data.class_path=labdata.Data"] and allowed == ["labdata", "os"]
    check_class_paths(["fit", "--trainer.callbacks.on_fit_start=os.system"], allowed)  # no raise
    with pytest.raises(SystemExit, match="LambdaCallback runs the functions"):
        check_class_paths(["fit", "--trainer.callbacks+=LambdaCallback"], allowed)
    check_class_paths(["fit", "--trainer.callbacks+=LambdaCallback"], ["lightning.pytorch.callbacks.LambdaCallback"])


def test_the_data_preparation_command_refuses_them_too(tmp_path: Path, evil_package: Path):
    from train.prepare.__main__ import main

    with pytest.raises(SystemExit, match=r"labdata\.Data .*--allow_class_path labdata"):
        main(["tokens", "--tokenizer", "tok", "--out", str(tmp_path / "out"),
              "--data", "{class_path: labdata.Data, init_args: {}}"])
    assert not evil_package.exists() and not (tmp_path / "out").exists()

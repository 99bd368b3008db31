"""study/configs.py through `python -m study configs|budget`: configs for a made-up token data set (vocab 64,
an 8x8 grid, 10 classes) whose shapes come from its meta.json and whose totals are the solver's
iso-parameter targets, `--out` and the refusal to overwrite, baseline YAMLs whose shapes disagree with
meta.json, the budget table's arguments, and the presets reproducing the tracked configs/ar byte for byte.
(That every tracked config parses and builds is tests/test_configs.py.)"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from engram_vision.budget import BUDGET_TOLERANCE, STUDY_RHOS, count_parameters, solve_budget
from engram_vision.config import EngramConfig, ModelConfig, model_config
from study.__main__ import main
from study.configs import PRESETS, RHO_TOLERANCE

REPO = Path(__file__).resolve().parents[2]
TRACKED = REPO / "configs" / "ar"
GPT_B_TOTAL = 110_888_448  # LlamaGen's GPT-B c2i at vocab 16384, 1000 classes
# gpt-small (dim 128, 4 blocks) at vocab 64, 10 classes, 64 tokens: embeddings (64 + 10 + 1) x 128, four
# blocks of 4 x 128^2 attention + 3 x 128 x 352 SwiGLU + 2 x 128 norms, final norm, head 128 x 64.
SMALL_ON_FAKE = 75 * 128 + 4 * (4 * 128 * 128 + 3 * 128 * 352 + 2 * 128) + 128 + 128 * 64
DIGITS_LAYOUT = ["--layers", "[1]", "--heads_per_order", "4", "--head_dim", "16"]


def _fake_tokens(root: Path, vocab: int = 64, grid: tuple[int, int] = (8, 8), classes: int = 10) -> Path:
    """root/tok/{train,val}/meta.json as train.prepare.extract_tokens writes them (no shards needed here)."""
    for split in ("train", "val"):
        folder = root / "tok" / split
        folder.mkdir(parents=True)
        meta = {"format": "engram-vision-tokens", "split": split, "codebook_size": vocab, "num_classes": classes,
                "grid": list(grid), "num_samples": 10, "num_views": 1, "dtype": "uint8",
                "tokenizer": "runs/fake/vq/tokenizer", "shards": []}
        (folder / "meta.json").write_text(json.dumps(meta))
    return root / "tok" / "train"


def _load(path: Path) -> tuple[ModelConfig, dict]:
    doc = yaml.safe_load(path.read_text())
    spec = dict(doc["model"]["gpt"])
    engram = spec.pop("engram")
    return ModelConfig(**spec, engram=EngramConfig(**engram) if engram else None), doc


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.glob("*.yaml"))}


def test_budget_command_prints_every_rho_of_the_study(capsys: pytest.CaptureFixture[str]) -> None:
    rows = main(["budget", "--size", "gpt-b"])
    lines = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert records == rows and [r["rho"] for r in records] == [*STUDY_RHOS, 1.0]
    assert records[-1]["total"] == GPT_B_TOTAL and records[-1]["rows_per_head"] is None
    for record in records[:-1]:
        assert record["total"] == record["backbone"] + record["memory"] and abs(record["error"]) <= 0.01
    assert sum(line.startswith("| ") for line in lines) == len(records) + 1  # header + one row per rho
    assert lines[0].startswith("gpt-b budget: 110,888,448 parameters")


def test_budget_arguments_change_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tokens = str(_fake_tokens(tmp_path))
    rows = main(["budget", "--size", "gpt-small", "--tokens", tokens, "--rhos", "[0.5, 1.0]", *DIGITS_LAYOUT])
    assert [r["rho"] for r in rows] == [0.5, 1.0]
    assert rows[1]["total"] == SMALL_ON_FAKE == count_parameters(model_config(
        "gpt-small", vocab_size=64, block_size=64)).total
    assert abs(rows[0]["total"] - SMALL_ON_FAKE) <= BUDGET_TOLERANCE * SMALL_ON_FAKE
    assert f"gpt-small budget: {SMALL_ON_FAKE:,} parameters on {tokens}/meta.json" in capsys.readouterr().out
    # Half the heads: the same memory needs about twice the rows per head.
    fewer = main(["budget", "--size", "gpt-small", "--tokens", tokens, "--rhos", "[0.5]", "--layers", "[1]",
                  "--heads_per_order", "2", "--head_dim", "16"])
    assert fewer[0]["rows_per_head"] == pytest.approx(2 * rows[0]["rows_per_head"], rel=0.1)
    # A parameter budget instead of the size's own count.
    bigger = main(["budget", "--size", "gpt-b", "--params", "3e8", "--rhos", "[0.5]"])
    assert abs(bigger[0]["total"] - 300_000_000) <= BUDGET_TOLERANCE * 300_000_000
    assert bigger[0]["dim"] > 768 and bigger[0]["n_layer"] == 12
    deeper = main(["budget", "--size", "gpt-b", "--params", "3e8", "--rhos", "[1.0]", "--family", "depth"])
    assert deeper[0]["dim"] == 768 and deeper[0]["n_layer"] > 12


def test_budget_help_documents_every_argument(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["budget", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, words in {"--params": "Total parameter budget", "--rhos": "Backbone shares",
                        "--heads_per_order": "Hash heads per n-gram order", "--tokens": "meta.json"}.items():
        assert flag in text and words in text, flag


def test_budget_rejects_layers_beyond_the_depth() -> None:
    with pytest.raises(ValueError, match=r"at least 7 blocks.*n_layer=4: pass --layers"):
        main(["budget", "--size", "gpt-small"])


def test_configs_from_a_made_up_data_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    _fake_tokens(tmp_path)
    written = main(["configs", "--preset", "digits", "--tokens", "tok/train", "--baseline", "gpt-small",
                    "--rhos", "[0.3, 0.5, 0.7]", "--out", "gen"])
    stems = ["gpt_small_baseline", "gpt_small_engram_rho0.3", "gpt_small_engram_rho0.5", "gpt_small_engram_rho0.7",
             "gpt_small_engram_rho0.5_frozen", "gpt_small_engram_rho0.5_gate0.1"]
    assert [p.name for p in written[:-1]] == [f"{s}.yaml" for s in stems]
    assert written[-1].name.startswith("gpt_small_plus_memory") and len(written) == 7
    assert capsys.readouterr().out.split() == [str(p) for p in written]  # the paths, one a line
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == sorted(p.name for p in written)

    configs = {p.stem: _load(p) for p in written}
    base, doc = configs["gpt_small_baseline"]
    assert (base.vocab_size, base.block_size, base.num_classes, base.token_grid) == (64, 64, 10, (8, 8))
    assert count_parameters(base).total == SMALL_ON_FAKE and base.engram is None
    assert doc["data"]["init_args"]["train_shards"] == "tok/train"
    assert doc["data"]["init_args"]["val_shards"] == "tok/val"
    assert doc["trainer"]["callbacks"][-1]["init_args"]["tokenizer"] == "runs/fake/vq/tokenizer"
    assert doc["trainer"]["logger"]["init_args"]["save_dir"] == "runs/ar/gpt_small_baseline"
    assert "# python -m train ar fit --config gen/gpt_small_baseline.yaml" in written[0].read_text()
    layout = PRESETS["digits"].engram
    for rho in (0.3, 0.5, 0.7):
        config, _ = configs[f"gpt_small_engram_rho{rho}"]
        counts = count_parameters(config)
        assert abs(counts.total - SMALL_ON_FAKE) <= BUDGET_TOLERANCE * SMALL_ON_FAKE
        assert abs(counts.rho - rho) <= RHO_TOLERANCE and counts.memory > 0
        assert config == solve_budget(SMALL_ON_FAKE, rho, base, layout, rho_tolerance=RHO_TOLERANCE).config
    mid, _ = configs["gpt_small_engram_rho0.5"]
    assert configs["gpt_small_engram_rho0.5_frozen"][0] == dataclasses.replace(
        mid, engram=dataclasses.replace(mid.engram, table="frozen"))
    assert configs["gpt_small_engram_rho0.5_gate0.1"][0].engram.gate == 0.1
    plus, _ = configs[written[-1].stem]
    assert count_parameters(dataclasses.replace(plus, engram=None)).total == SMALL_ON_FAKE
    assert count_parameters(plus).memory == count_parameters(mid).memory
    assert written[-1].stem == f"gpt_small_plus_memory{round(count_parameters(mid).memory / 1e6, 2)}m"


def test_generated_configs_parse_with_the_training_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.core import LightningDataModule

    from train.cli import STAGES

    class ParseOnly(LightningCLI):
        def instantiate_classes(self) -> None:
            pass

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["python -m train"])  # LightningCLI warns when pytest's own flags are there
    _fake_tokens(tmp_path, grid=(4, 8))  # a non-square grid must reach the model as `grid`
    written = main(["configs", "--preset", "digits", "--tokens", "tok/train", "--baseline", "gpt-small",
                    "--out", "gen", "--frozen", "false", "--gate", "null", "--plus_memory", "false"])
    assert [p.name for p in written] == ["gpt_small_baseline.yaml", "gpt_small_engram_rho0.5.yaml"]
    for path in written:
        cli = ParseOnly(STAGES["ar"](), LightningDataModule, subclass_mode_data=True, run=False,
                        args=["--config", str(path)])
        gpt = cli.config["model"]["gpt"]
        assert (gpt["vocab_size"], gpt["block_size"], list(gpt["grid"])) == (64, 32, [4, 8])


def test_default_out_writes_nothing_into_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _snapshot(TRACKED)
    monkeypatch.chdir(tmp_path)
    _fake_tokens(tmp_path)
    written = main(["configs", "--preset", "digits", "--tokens", "tok/train", "--baseline", "gpt-small"])
    assert {p.parent for p in written} == {Path("runs/configs/gpt_small")}
    assert all((tmp_path / p).is_file() for p in written) and not (tmp_path / "configs").exists()
    assert _snapshot(TRACKED) == before


def test_refuses_to_overwrite_other_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _fake_tokens(tmp_path)
    args = ["configs", "--preset", "digits", "--tokens", "tok/train", "--baseline", "gpt-small", "--out", "gen"]
    written = main(args)
    texts = {p: p.read_bytes() for p in written}
    assert main(args) == written  # the same content again: fine, nothing changes
    edited = written[1]
    edited.write_text("# mine\n")
    untouched = _snapshot(tmp_path / "gen")
    with pytest.raises(FileExistsError, match=r"gpt_small_engram_rho0.5.yaml: pass --overwrite true"):
        main([*args, "--rhos", "[0.5]"])
    assert _snapshot(tmp_path / "gen") == untouched  # refused before writing anything
    main([*args, "--overwrite", "true"])
    assert {p: p.read_bytes() for p in written} == texts


def test_baseline_yaml_shapes_must_match_meta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _fake_tokens(tmp_path)
    digits = (TRACKED / "digits_baseline.yaml").read_text().replace("runs/demo/tokens", "tok")
    Path("digits.yaml").write_text(digits)
    args = ["configs", "--baseline", "digits.yaml", "--out", "gen", *DIGITS_LAYOUT]
    with pytest.raises(ValueError, match=r"model.gpt.vocab_size is 256 but tok/train/meta.json has codebook_size 64"):
        main(args)
    Path("digits.yaml").write_text(digits.replace("vocab_size: 256", "vocab_size: 64"))
    with pytest.raises(ValueError, match=r"model.gpt.block_size is 16 but .* grid \[8, 8\] \(64 tokens\)"):
        main(args)
    Path("digits.yaml").write_text(digits.replace("vocab_size: 256", "vocab_size: 64")
                                   .replace("block_size: 16", "block_size: 64"))
    written = main(args)  # no preset: the study's rhos
    rho_files = [f"digits_engram_rho{r}.yaml" for r in STUDY_RHOS]
    assert [p.name for p in written][:6] == ["digits_baseline.yaml", *rho_files]
    base, doc = _load(written[0])
    assert count_parameters(base).total == SMALL_ON_FAKE
    assert doc["model"]["lr"] == 1.0e-3 and doc["trainer"]["max_steps"] == 720  # the YAML's own settings
    assert doc["trainer"]["logger"]["init_args"]["save_dir"] == "runs/ar/digits_baseline"
    for path, rho in zip(written[1:6], STUDY_RHOS, strict=True):
        counts = count_parameters(_load(path)[0])
        assert abs(counts.total - SMALL_ON_FAKE) <= BUDGET_TOLERANCE * SMALL_ON_FAKE
        assert abs(counts.rho - rho) <= RHO_TOLERANCE


def test_configs_errors_name_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _fake_tokens(tmp_path)
    with pytest.raises(ValueError, match="pass --preset"):
        main(["configs", "--baseline", "gpt-small", "--tokens", "tok/train"])
    with pytest.raises(ValueError, match=r"n_layer=4: pass --layers"):
        main(["configs", "--preset", "digits", "--baseline", "gpt-small", "--tokens", "tok/train",
              "--layers", "[1, 6]"])
    with pytest.raises(ValueError, match=r"--variant_rho 0.3 is not one of --rhos \[0.5\]"):
        main(["configs", "--preset", "digits", "--variant_rho", "0.3", "--out", "gen"])
    with pytest.raises(FileNotFoundError, match="pass --tokens a local token folder"):
        main(["configs", "--preset", "digits", "--tokens", "missing/train", "--out", "gen"])
    assert not Path("gen").exists()


def test_presets_reproduce_the_tracked_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m study configs --preset <p> --out configs/ar` for every preset is exactly configs/ar."""
    monkeypatch.chdir(tmp_path)
    written = [path for key in sorted(PRESETS) for path in main(["configs", "--preset", key, "--out", "configs/ar"])]
    assert sorted(p.name for p in written) == sorted(p.name for p in TRACKED.glob("*.yaml"))
    for path in written:
        assert (tmp_path / path).read_bytes() == (TRACKED / path.name).read_bytes(), path.name

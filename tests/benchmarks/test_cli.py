"""The benchmark scripts' command lines: each script's dataclass read by jsonargparse (`parse`), its
per-script defaults, the accelerator/precision vocabulary and what it maps to, refusals that name the
field, and `--help` showing the field docstrings. Nothing is timed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import common  # noqa: E402


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and jsonargparse look the module up by name
    spec.loader.exec_module(module)
    return module


decode_cache, train_step, hashing, host_tables = (_script(n) for n in ("decode_cache", "train_step", "hashing",
                                                                        "host_tables"))
SCRIPTS = {"decode_cache": decode_cache, "train_step": train_step, "hashing": hashing, "host_tables": host_tables}
MODEL_SCRIPTS = ("decode_cache", "train_step", "host_tables")  # the ones with --size and --precision


@pytest.mark.parametrize(("name", "defaults"), [
    ("decode_cache", {"batch": 4, "repeats": 2, "engram": "small", "cfg_scale": 2.0, "compile": False,
                      "skip_recompute": False, "bandwidth_mib": 1024}),
    ("train_step", {"batch": 8, "repeats": 3, "engram": "small", "compile": False, "peak_flops": None}),
    ("hashing", {"batch": 8, "repeats": 20, "engram": "study", "decode_rows": 128}),
    ("host_tables", {"batch": 4, "repeats": 2, "engram": "small", "cfg_scale": 2.0}),
])
def test_empty_command_line_gives_each_scripts_defaults(name, defaults):
    args = SCRIPTS[name].parse([])
    for field, value in {"grid": 16, "rows_per_head": None, "accelerator": "cpu", "threads": None,
                         **defaults}.items():
        assert getattr(args, field) == value, field
    assert args.device == "cpu"
    if name in MODEL_SCRIPTS:
        assert (args.size, args.precision, args.dtype, args.dtype_name) == ("gpt-small", "32-true", torch.float32,
                                                                            "float32")


def test_decode_flags_parse_to_fields_device_and_dtype():
    args = decode_cache.parse(["--size", "gpt-b", "--engram", "study", "--grid", "8", "--batch", "3",
                               "--rows_per_head", "7", "--accelerator", "cpu", "--precision", "bf16-true",
                               "--repeats", "5", "--threads", "1", "--cfg_scale", "1.5", "--compile", "true",
                               "--skip_recompute", "true", "--bandwidth_mib", "64"])
    assert isinstance(args, decode_cache.DecodeArgs)
    assert (args.size, args.engram, args.grid, args.batch, args.rows_per_head, args.repeats, args.threads) == (
        "gpt-b", "study", 8, 3, 7, 5, 1)
    assert (args.cfg_scale, args.compile, args.skip_recompute, args.bandwidth_mib) == (1.5, True, True, 64)
    assert (args.device, args.dtype, args.dtype_name) == ("cpu", torch.bfloat16, "bfloat16")


def test_other_scripts_own_flags():
    train = train_step.parse(["--compile", "true", "--peak_flops", "1e12", "--precision", "bf16-true"])
    assert (train.compile, train.peak_flops, train.dtype) == (True, 1e12, torch.bfloat16)
    hashed = hashing.parse(["--decode_rows", "16", "--rows_per_head", "7", "--engram", "small"])
    assert (hashed.decode_rows, hashed.rows_per_head, hashed.engram) == (16, 7, "small")
    host = host_tables.parse(["--cfg_scale", "1.0", "--batch", "2"])
    assert (host.cfg_scale, host.batch) == (1.0, 2)


@pytest.mark.parametrize("name", MODEL_SCRIPTS)
def test_unknown_precision_is_refused_naming_the_field(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[name].parse(["--precision", "bf16"])
    assert exit_info.value.code != 0
    error = capsys.readouterr().err
    assert "precision" in error and "bf16-true" in error  # the field and the accepted values


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_unknown_accelerator_is_refused_naming_the_field(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[name].parse(["--accelerator", "tpu"])
    assert exit_info.value.code != 0
    assert "accelerator" in capsys.readouterr().err


def test_hashing_builds_no_model_so_takes_no_precision(capsys):
    with pytest.raises(SystemExit):
        hashing.parse(["--precision", "32-true"])
    assert "--precision" in capsys.readouterr().err


def test_precision_names_map_to_the_dtypes_the_json_records():
    assert common.DTYPES == {"32-true": "float32", "bf16-true": "bfloat16"}
    for precision, dtype in (("32-true", torch.float32), ("bf16-true", torch.bfloat16)):
        args = train_step.TrainStepArgs(precision=precision)
        assert (args.dtype, args.dtype_name) == (dtype, str(dtype).removeprefix("torch."))


def test_accelerator_names_map_to_a_torch_device():
    assert decode_cache.DecodeArgs(accelerator="auto").device == ("cuda" if torch.cuda.is_available() else "cpu")
    for name in ("cuda", "gpu"):
        args = decode_cache.DecodeArgs(accelerator=name)
        if torch.cuda.is_available():
            assert args.device == "cuda"
        else:
            with pytest.raises(ValueError, match="accelerator"):
                _ = args.device


def test_apply_threads_sets_torchs_thread_count():
    before = torch.get_num_threads()
    try:
        hashing.HashingArgs(threads=1).apply_threads()
        assert torch.get_num_threads() == 1
        hashing.HashingArgs().apply_threads()  # threads None leaves it alone
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("name", "docstring"), [
    ("decode_cache", "Size in MiB of the copy that measures memory bandwidth"),
    ("train_step", "The device's peak FLOP/s for the dtype"),
    ("hashing", "Rows of the decode-step shape"),
    ("host_tables", "Classifier-free guidance scale of the generated"),
])
def test_help_shows_the_module_docstring_and_field_docstrings(name, docstring, capsys):
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[name].parse(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # help wraps lines
    assert docstring in text
    assert "Where it runs, in Lightning's vocabulary" in text  # a shared field's docstring
    assert f"python benchmarks/{name}.py [--" in text  # the description's usage line, as written


def test_script_runs_as_a_program_with_help():
    result = subprocess.run([sys.executable, str(BENCHMARKS / "decode_cache.py"), "--help"], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "--skip_recompute {true,false}" in result.stdout
    assert "Skip the (slow) full-recompute baseline." in result.stdout

"""Model folders and weight files that are unfinished, corrupt or disagree, and leftovers of killed writers.

- Unfinished: a save killed between the weights and config.json (a real SIGKILL, and a failed config write)
  leaves a folder `model_dir_complete` calls unfinished and every loader refuses naming the folder, the
  missing part and the fix; a failed re-save keeps the previous folder whole; folders of older versions
  still load.
- Disagreeing: a config.json edited or copied from another folder (the grid, RoPE base, hash seed or table
  size of the AR prior; the codebook size, lookup or channels of a tokenizer), or weights copied in from
  another model, are refused naming config.json and the field (or the SHA-256), where shapes that still fit
  used to load other logits silently.
- Corrupt: truncated or garbage weights (our safetensors, LlamaGen `.pt` through each loader, a Lightning
  `.ckpt` through `safe_torch_load`) and config.json files that are not JSON, lack `kind`/`config` or hold
  unknown or mistyped fields, each naming the file (and field) and the fix.
- Leftovers: a temporary file of a killed writer goes on the next write of that file; those of live
  writers (another process's lock, other threads) and of other files in the folder are kept.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from engram_vision.checkpoint import load_any_gpt, load_gpt, load_llamagen_gpt, save_gpt
from tokenizers_vq import VQModel, vq_config
from tokenizers_vq.checkpoint import VQ_KIND, load_llamagen_vq, load_tokenizer, load_vq, save_vq
from tokenizers_vq.files import (
    CorruptFileError,
    atomic_write,
    atomic_write_text,
    remove_stale_temps,
    safe_torch_load,
)
from tokenizers_vq.model_dir import model_dir_complete, model_dir_problem

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def _vq(seed: int = 0, **overrides) -> VQModel:
    torch.manual_seed(seed)
    return VQModel(vq_config("vq-tiny", **overrides)).eval()


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _edit_config(folder: Path, field: str, value) -> None:
    meta = json.loads((folder / "config.json").read_text())
    *parents, last = field.split(".")
    target = meta["config"]
    for name in parents:
        target = target[name]
    target[last] = value
    (folder / "config.json").write_text(json.dumps(meta))


def _old_format(folder: Path) -> None:
    """Rewrite a saved folder as earlier versions wrote it: no metadata record, config.json {kind, config}."""
    from safetensors.torch import load_file, save_file

    save_file(load_file(folder / "model.safetensors"), str(folder / "model.safetensors"), metadata={"format": "pt"})
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({"kind": meta["kind"], "config": meta["config"]}))


@pytest.fixture
def saved(random_model, tiny_config, tmp_path):
    """kind -> (folder, model) of a freshly saved tokenizer or AR prior."""
    def make(kind: str, name: str = "m", seed: int = 0):
        folder = tmp_path / name
        if kind == "vq":
            model = _vq(seed)
            save_vq(model, folder)
        else:
            model = random_model(tiny_config(), seed=seed)
            save_gpt(model, folder)
        return folder, model
    return make


LOADERS = {"vq": (load_vq, load_tokenizer), "gpt": (load_gpt, load_any_gpt)}


# ------------------------------------------------------------------------------------------ unfinished


@pytest.mark.parametrize("kind", ["vq", "gpt"])
def test_weights_without_config_is_an_unfinished_folder(kind, saved):
    folder, _ = saved(kind)
    (folder / "config.json").unlink()  # what a kill between the two writes leaves
    assert not model_dir_complete(folder)
    problem = model_dir_problem(folder)
    assert str(folder) in problem and "no config.json" in problem and "interrupted" in problem
    assert "re-export" in problem
    for loader in LOADERS[kind]:
        with pytest.raises(FileNotFoundError, match=r"is incomplete: it has model\.safetensors but no config\.json"):
            loader(folder)


def test_kill_between_weights_and_config_leaves_a_folder_nothing_takes_for_finished(tmp_path):
    """A real SIGKILL of a re-save of a complete folder, after the new weights are in place and before
    config.json is written: the folder is unfinished (never new weights under the old config.json); the
    rerun's save completes it."""
    folder = tmp_path / "tok"
    save_vq(_vq(0), folder)
    assert model_dir_complete(folder, VQ_KIND)
    script = (
        "import sys, time, torch\n"
        "import tokenizers_vq.model_dir as model_dir\n"
        "from tokenizers_vq import VQModel, vq_config\n"
        "from tokenizers_vq.checkpoint import save_vq\n"
        "def hang(path, chunk=0):\n"
        "    print('weights renamed', flush=True); time.sleep(120)\n"
        "model_dir.file_sha256 = hang\n"
        "torch.manual_seed(1)\n"
        "save_vq(VQModel(vq_config('vq-tiny')), sys.argv[1])\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", script, str(folder)], stdout=subprocess.PIPE, text=True,
                             cwd=REPO, env=env)
    try:
        assert child.stdout.readline().strip() == "weights renamed"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    assert _listing(folder) == ["model.safetensors"]
    assert not model_dir_complete(folder, VQ_KIND)
    with pytest.raises(FileNotFoundError, match="save was interrupted"):
        load_tokenizer(folder)
    new = _vq(1)
    save_vq(new, folder)
    assert model_dir_complete(folder, VQ_KIND)
    assert torch.equal(load_vq(folder).encoder.conv_in.weight, new.encoder.conv_in.weight)


def test_failed_config_write_leaves_an_unfinished_folder_and_a_failed_weights_write_the_old_one(saved, monkeypatch):
    import tokenizers_vq.model_dir as model_dir

    folder, old = saved("vq")

    def broken_save_file(tensors, tmp, metadata=None):
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("killed")

    monkeypatch.setattr(model_dir, "save_file", broken_save_file)
    with pytest.raises(RuntimeError, match="could not write"):
        save_vq(_vq(1), folder)
    assert model_dir_complete(folder) and _listing(folder) == ["config.json", "model.safetensors"]
    assert torch.equal(load_vq(folder).encoder.conv_in.weight, old.encoder.conv_in.weight)
    monkeypatch.undo()

    def no_config(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_dir, "atomic_write_text", no_config)
    with pytest.raises(OSError):
        save_vq(_vq(1), folder)
    assert not model_dir_complete(folder) and _listing(folder) == ["model.safetensors"]


def test_missing_folder_or_parts_are_named(saved, tmp_path):
    assert not model_dir_complete(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vq(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json and no model.safetensors: it is not a saved"):
        load_gpt(tmp_path / "empty")
    folder, _ = saved("gpt")
    (folder / "model.safetensors").unlink()
    assert "has config.json but no model.safetensors" in model_dir_problem(folder)
    with pytest.raises(FileNotFoundError, match="copy the whole folder again or re-export"):
        load_any_gpt(folder)


@pytest.mark.parametrize("kind", ["vq", "gpt"])
def test_folders_of_older_versions_still_load_and_count_as_complete(kind, saved):
    folder, model = saved(kind)
    _old_format(folder)
    assert model_dir_complete(folder)
    loaded = LOADERS[kind][0](folder)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_complete_checks_the_kind(saved):
    folder, _ = saved("vq")
    assert model_dir_complete(folder, VQ_KIND) and not model_dir_complete(folder, "engram-vision-gpt")
    with pytest.raises(ValueError, match="holds a 'engram-vision-vq' model, not 'engram-vision-gpt'"):
        load_gpt(folder)


# ------------------------------------------------------------------------------------------ disagreeing


@pytest.mark.parametrize(("kind", "field", "value"), [
    ("gpt", "grid", [2, 8]),                 # same block size: every shape fits, other RoPE positions
    ("gpt", "rope_base", 500.0),             # no shape at all depends on it
    ("gpt", "engram.hash_seed", 5),
    ("gpt", "engram.rows_per_head", 29),
    ("vq", "codebook_l2_norm", False),       # same shapes, other codes
    ("vq", "codebook_size", 32),
    ("vq", "z_channels", 64),
])
def test_config_that_contradicts_the_weights_is_refused_naming_the_field(kind, field, value, saved):
    folder, _ = saved(kind)
    _edit_config(folder, field, value)
    with pytest.raises(CorruptFileError) as error:
        LOADERS[kind][0](folder)
    message = str(error.value)
    assert f"{folder / 'config.json'} does not belong to the weights" in message
    assert f"(field config.{field})" in message and "restore this folder's own config.json" in message


def test_config_json_of_another_save_is_refused_by_the_weights_hash(saved):
    first, _ = saved("vq", "a", seed=0)
    second, _ = saved("vq", "b", seed=1)
    (second / "config.json").write_bytes((first / "config.json").read_bytes())
    assert model_dir_complete(second)  # the cheap check: same sizes; the load hashes
    with pytest.raises(CorruptFileError, match=r"model\.safetensors is not the file .*config\.json describes "
                                               r"\(SHA-256"):
        load_tokenizer(second)


def test_weights_of_another_model_are_refused_naming_the_field(random_model, tiny_config, tmp_path):
    from dataclasses import replace

    config = tiny_config()
    save_gpt(random_model(config), tmp_path / "a")
    save_gpt(random_model(replace(config, engram=replace(config.engram, hash_seed=3))), tmp_path / "b")
    (tmp_path / "a" / "model.safetensors").write_bytes((tmp_path / "b" / "model.safetensors").read_bytes())
    with pytest.raises(CorruptFileError, match=r"field config\.engram\.hash_seed\): config\.engram\.hash_seed is 0 in "
                                               r"config\.json but 3 in the weights"):
        load_gpt(tmp_path / "a")


# ------------------------------------------------------------------------------------------ corrupt


def _cut(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"half": data[: len(data) // 2], "empty": b"", "header": data[:8],
                      "garbage": b"not a checkpoint at all " * 40}[how])


@pytest.mark.parametrize("how", ["half", "empty", "header", "garbage"])
def test_damaged_weights_of_a_folder_are_named_truncated(how, saved):
    folder, _ = saved("vq")
    _cut(folder / "model.safetensors", how)
    assert not model_dir_complete(folder)  # the recorded size differs
    with pytest.raises(CorruptFileError, match=r"model\.safetensors is truncated or corrupt: \d+ bytes, but "):
        load_vq(folder)


@pytest.mark.parametrize("how", ["half", "empty", "garbage"])
def test_damaged_weights_of_an_old_folder_are_named_truncated(how, saved):
    folder, _ = saved("gpt")
    _old_format(folder)
    _cut(folder / "model.safetensors", how)
    with pytest.raises(CorruptFileError, match=r"model\.safetensors is truncated or corrupt \(safetensors: .*re-export"):
        load_gpt(folder)


TORCH_LOADERS = {
    "load_llamagen_gpt": lambda p: load_llamagen_gpt(p, "gpt-tiny"),
    "load_any_gpt": lambda p: load_any_gpt(p, "gpt-tiny"),
    "load_llamagen_vq": lambda p: load_llamagen_vq(p, "vq-tiny"),
    "load_tokenizer": lambda p: load_tokenizer(p, "vq-tiny"),
    "safe_torch_load(.ckpt)": safe_torch_load,
}


@pytest.mark.parametrize("how", ["half", "empty", "garbage"])
@pytest.mark.parametrize("loader", sorted(TORCH_LOADERS))
def test_damaged_torch_files_are_named_truncated_not_unsafe(loader, how, tmp_path):
    path = tmp_path / ("last.ckpt" if loader.startswith("safe") else "c2i_B_256.pt")
    torch.save({"model": {"w": torch.randn(64, 64)}, "state_dict": {"w": torch.randn(64, 64)}}, path)
    _cut(path, how)
    with pytest.raises(CorruptFileError) as error:
        TORCH_LOADERS[loader](path)
    message = str(error.value)
    assert message.startswith(f"{path} is truncated or corrupt") and "copy it again" in message
    assert "weights_only" not in message  # torch's advice to load it unsafely is not passed on


def _meta(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


CORRUPT_CONFIGS = {  # name -> (how config.json is damaged, what the error must name)
    "cut": (lambda f, m: (f / "config.json").write_text(json.dumps(m)[:40]), r"is not valid JSON \(.* line 1"),
    "not utf-8": (lambda f, m: (f / "config.json").write_bytes(b"\xff\xfe{}"), "is not UTF-8"),
    "a list": (lambda f, m: (f / "config.json").write_text("[1, 2]"), "holds a JSON list, not an object"),
    "no kind": (lambda f, m: m.pop("kind"), "has no 'kind' field"),
    "no config": (lambda f, m: m.pop("config"), "has no 'config' field"),
    "config a string": (lambda f, m: m.update(config="vq-tiny"), "field 'config' must be"),
    "unknown top field": (lambda f, m: m.update(steps=10), "unknown field 'steps'"),
    "bad hash field": (lambda f, m: m.update(weights_sha256="abc"), "field 'weights_sha256' must be 64 hex"),
    "unknown config field": (lambda f, m: m["config"].update(codebook_sz=64), r"unknown field config\.codebook_sz"),
    "mistyped": (lambda f, m: m["config"].update(codebook_size="64"), r"field config\.codebook_size = '64' is not"),
    "out of range": (lambda f, m: m["config"].update(dropout=2.0), r"VQConfig\.dropout must be in \[0, 1\)"),
}


@pytest.mark.parametrize("name", sorted(CORRUPT_CONFIGS))
def test_corrupt_config_json_is_named_with_its_field(name, saved):
    folder, _ = saved("vq")
    damage, expected = CORRUPT_CONFIGS[name]
    meta = _meta(folder)
    damage(folder, meta)
    if name not in ("cut", "not utf-8", "a list"):  # the others edit the parsed file
        (folder / "config.json").write_text(json.dumps(meta))
    for loader in (load_vq, load_tokenizer):
        with pytest.raises(CorruptFileError, match=expected) as error:
            loader(folder)
        assert str(folder / "config.json") in str(error.value)


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("heads", 2, r"unknown field config\.engram\.heads \(not a EngramConfig field"),
    ("layers", "0,1", r"field config\.engram\.layers = '0,1' is not a valid tuple"),
    ("mode", "3d", r"field config\.engram\.mode = '3d' is not a valid Literal"),
])
def test_corrupt_nested_engram_config_names_the_field(field, value, expected, saved):
    folder, _ = saved("gpt")
    _edit_config(folder, f"engram.{field}", value)
    with pytest.raises(CorruptFileError, match=expected):
        load_any_gpt(folder)


# ------------------------------------------------------------------------------------------ leftovers


def test_temp_of_a_killed_writer_goes_with_the_next_write(tmp_path):
    target = tmp_path / "metrics.json"
    script = ("import sys, time\nfrom pathlib import Path\nfrom tokenizers_vq.files import atomic_write\n"
              "def half(tmp):\n    Path(tmp).write_text('{\"half\": ')\n    print(tmp, flush=True)\n"
              "    time.sleep(120)\n"
              "atomic_write(sys.argv[1], half)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, text=True,
                             cwd=REPO, env=env)
    try:
        leftover = Path(child.stdout.readline().strip())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    assert leftover.parent == tmp_path and leftover.is_file() and not target.exists()
    atomic_write_text(target, '{"whole": true}')
    assert _listing(tmp_path) == ["metrics.json"] and json.loads(target.read_text()) == {"whole": True}


def test_temps_of_live_writers_and_of_other_files_are_kept(tmp_path):
    live = tmp_path / ".last.ckpt.0.tmp"
    live.write_bytes(b"being written")
    other = tmp_path / ".last.ckpt.json.0.tmp"  # another file's (unlocked) leftover: not this name's
    other.write_bytes(b"x")
    old_other = tmp_path / ".last.ckpt.json.x1y2z3.tmp"
    old_other.write_bytes(b"x")
    holder = os.open(live, os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # as a writer in another process holds its temporary file
        atomic_write(tmp_path / "last.ckpt", lambda tmp: Path(tmp).write_bytes(b"new"))
        assert live.read_bytes() == b"being written" and other.exists() and old_other.exists()
        assert (tmp_path / "last.ckpt").read_bytes() == b"new"
        assert remove_stale_temps(tmp_path / "last.ckpt") == []  # the live one is kept by this helper too
    finally:
        os.close(holder)  # that writer died
    atomic_write(tmp_path / "last.ckpt", lambda tmp: Path(tmp).write_bytes(b"newer"))
    assert not live.exists() and other.exists() and old_other.exists()
    assert remove_stale_temps(tmp_path / "last.ckpt.json") == [other, old_other]


def test_remove_stale_temps_takes_only_its_own_name(tmp_path):
    """`.last.*.tmp` also matches `last.ckpt`'s temporary files: the helper for `last` leaves them."""
    mine, longer = tmp_path / ".last.a1b2c3.tmp", tmp_path / ".last.ckpt.d4e5f6.tmp"
    for path in (mine, longer):
        path.write_bytes(b"x")
    assert remove_stale_temps(tmp_path / "last") == [mine] and longer.exists()


def test_threads_writing_one_file_at_once_all_succeed(tmp_path):
    target, count = tmp_path / "manifest.json", 6
    together = threading.Barrier(count, timeout=30)
    errors: list[BaseException] = []

    def write(i: int) -> None:
        def slow(tmp: str) -> None:
            Path(tmp).write_text(json.dumps({"writer": i}))
            together.wait()  # every writer's temporary file exists at once; each writer's cleanup runs

        try:
            atomic_write(target, slow)
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert json.loads(target.read_text())["writer"] in range(count) and _listing(tmp_path) == ["manifest.json"]


def test_saving_a_model_removes_leftovers_of_both_its_files(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in (".model.safetensors.0.tmp", ".config.json.0.tmp", ".model.safetensors.2.tmp"):
        (folder / name).write_bytes(b"killed mid-write")
    save_vq(_vq(), folder)
    assert _listing(folder) == ["config.json", "model.safetensors"] and model_dir_complete(folder)

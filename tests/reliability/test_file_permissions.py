"""Files the project writes get the mode the process umask asks for, like any new file.

`atomic_write` creates its temporary file with mode 0666 and lets the kernel apply the umask, so a file
written under umask 022 is 0644 and under 002 0664 (group members of a shared cluster can read the
checkpoints, models, samples and reports), and under 077 stays private (0600). Tried through the write
helpers, the model folders (`save_model_dir`, `save_vq`, `save_gpt`) and Lightning's checkpoints
(`train.checkpoints.AtomicCheckpointIO`); a replaced file gets the same mode as a new one, and the umask
is never read or changed through `os.umask` (a process-global round trip that races with other threads).
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
import torch

from engram_vision.checkpoint import save_gpt
from tokenizers_vq import VQModel, vq_config
from tokenizers_vq.checkpoint import save_vq
from tokenizers_vq.files import atomic_write, atomic_write_text
from tokenizers_vq.model_dir import save_model_dir

UMASKS = [0o022, 0o002, 0o077]


@pytest.fixture(params=UMASKS, ids=lambda m: f"umask{m:03o}")
def umask(request):
    """Run the test under this umask; the previous one is restored afterwards."""
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _plain_file_mode(folder: Path) -> int:
    """The mode an ordinary `open(..., "w")` of a new file gets here (what a user expects)."""
    reference = folder / "reference-plain-open.txt"
    with open(reference, "w") as handle:
        handle.write("x")
    mode = _mode(reference)
    reference.unlink()
    return mode


def _checkpoint_io_write(path: Path) -> list[Path]:
    from train.checkpoints import AtomicCheckpointIO

    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 7}, path)
    return [path]


WRITERS = {
    "atomic_write_text": lambda d: (atomic_write_text(d / "metrics.json", "{}"), [d / "metrics.json"])[1],
    "atomic_write-sync": lambda d: (atomic_write(d / "x.bin", lambda t: Path(t).write_bytes(b"1"), sync=True),
                                    [d / "x.bin"])[1],
    "save_model_dir": lambda d: (save_model_dir(torch.nn.Linear(2, 2), {"n": 2}, "test-kind", d / "m"),
                                 [d / "m" / "model.safetensors", d / "m" / "config.json"])[1],
    "save_vq": lambda d: (save_vq(VQModel(vq_config("vq-tiny")), d / "tok"),
                          [d / "tok" / "model.safetensors", d / "tok" / "config.json"])[1],
    "AtomicCheckpointIO": lambda d: _checkpoint_io_write(d / "checkpoints" / "last.ckpt"),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_written_files_follow_the_umask(writer: str, umask: int, tmp_path: Path) -> None:
    expected = 0o666 & ~umask
    assert _plain_file_mode(tmp_path) == expected  # this folder has no default ACL that would change it
    for path in WRITERS[writer](tmp_path):
        assert _mode(path) == expected, (path.name, oct(_mode(path)), oct(expected))
    assert not list(tmp_path.rglob("*.tmp"))


def test_exported_gpt_follows_the_umask(umask: int, random_model, tiny_config, tmp_path: Path) -> None:
    save_gpt(random_model(tiny_config()), tmp_path / "model")
    assert {name: _mode(tmp_path / "model" / name) for name in ("config.json", "model.safetensors")} == {
        "config.json": 0o666 & ~umask, "model.safetensors": 0o666 & ~umask}


@pytest.mark.parametrize("old_mode", [0o600, 0o640, 0o666])
def test_a_replaced_file_gets_the_mode_of_a_new_one(old_mode: int, tmp_path: Path) -> None:
    """The decision documented in atomic_write: the old file's mode is not kept, so files an earlier
    version wrote as 0600 become readable on their next write."""
    previous = os.umask(0o022)
    try:
        target = tmp_path / "last.ckpt"
        target.write_bytes(b"old")
        target.chmod(old_mode)
        atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"new"))
        assert target.read_bytes() == b"new" and _mode(target) == 0o644
    finally:
        os.umask(previous)


def test_the_umask_is_never_touched_even_with_writer_threads(tmp_path: Path, monkeypatch) -> None:
    """Writers in 8 threads at once, under umask 002, with `os.umask` made to fail: every file is 0664."""
    previous = os.umask(0o002)
    try:
        def no_umask(mask):
            raise AssertionError("os.umask called: a round trip changes the umask of every thread")

        monkeypatch.setattr(os, "umask", no_umask)
        errors: list[BaseException] = []

        def write(i: int) -> None:
            try:
                for k in range(5):
                    atomic_write_text(tmp_path / f"t{i}" / f"f{k}.json", str(k))
            except BaseException as error:  # reported by the main thread
                errors.append(error)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        monkeypatch.undo()
        os.umask(previous)
    assert not errors
    modes = {_mode(path) for path in tmp_path.rglob("f*.json")}
    assert len(list(tmp_path.rglob("f*.json"))) == 40 and modes == {0o664}

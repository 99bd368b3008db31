"""`train.strategies.BlockFSDPStrategy` on two CPU ranks (gloo), on a small Engram model (LitAR).

One torchrun launch of tests/train/fsdp_steps.py trains 6 steps with full checkpoints, resumes its step-4
checkpoint, and does the same with sharded checkpoints. Checked here: the per-step loss (the mean of the
two ranks' half batches) equals one process's on the whole batch; both resumes continue with the losses of
the uninterrupted run; the full checkpoint is one file and the sharded one a folder of per-rank files; the
exported model (ExportModel -> model/) loads in one process and computes the same logits as the trained
weights in the full checkpoint, and nearly those of the one-process model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from engram_vision.checkpoint import load_gpt
from engram_vision.model import EngramGPT

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests/train/fsdp_steps.py"
_spec = importlib.util.spec_from_file_location("fsdp_steps", SCRIPT)
steps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(steps)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(token_shards, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 images of 4x4 codes, 70% of each image's codes its label x 4 (something to learn)."""
    rng = np.random.default_rng(0)
    labels = [i % 4 for i in range(steps.GLOBAL_BATCH)]
    codes = [np.where(rng.random((1, 4, 4)) < 0.7, label * 4, rng.integers(0, 16, (1, 4, 4))) for label in labels]
    return token_shards(tmp_path_factory.mktemp("fsdp_tokens"), codes, labels, codebook=16, num_classes=4)


@pytest.fixture(scope="module")
def fsdp(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of the two-rank run (losses per fit and rank, checkpoints, the exported model)."""
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(SCRIPT), str(shards), str(out)]
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the two-rank FSDP run did not end within {error.timeout} s (a rank waits for the other)")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return out


@pytest.fixture(scope="module")
def one_process(shards: Path) -> tuple[dict[int, float], EngramGPT]:
    """The same model and steps in one process on the whole batch: (losses by step, trained model)."""
    log, module = steps.LossLog(), steps.module()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps.STEPS, logger=False, callbacks=[log],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(module, datamodule=steps.token_data(str(shards), 1))
    return log.losses, module.model.eval()


def _losses(out: Path, fit: str) -> dict[int, float]:
    """Global step -> the mean over both ranks of their losses (equal batches: the global batch's loss)."""
    ranks = [json.loads((out / f"{fit}.rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys()
    return {int(step): (ranks[0][step] + ranks[1][step]) / 2 for step in ranks[0]}


def test_two_rank_losses_equal_one_process_on_the_global_batch(fsdp: Path, one_process) -> None:
    reference, _ = one_process
    assert sorted(reference) == list(range(1, steps.STEPS + 1))
    assert reference[steps.STEPS] < reference[1] - 0.1  # it trains
    rank0 = json.loads((fsdp / "full.rank0.json").read_text())
    rank1 = json.loads((fsdp / "full.rank1.json").read_text())
    assert abs(rank0["3"] - rank1["3"]) > 1e-4  # each rank saw its own half of the batch
    for fit in ("full", "sharded"):
        losses = _losses(fsdp, fit)
        assert sorted(losses) == sorted(reference)
        for step, loss in reference.items():
            assert losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), (fit, step)


def test_resumes_from_full_and_sharded_checkpoints_continue_the_same_losses(fsdp: Path) -> None:
    for kind in ("full", "sharded"):
        uninterrupted, resumed = _losses(fsdp, kind), _losses(fsdp, f"{kind}_resumed")
        assert sorted(resumed) == list(range(steps.RESUME_STEP + 1, steps.STEPS + 1))
        for step, loss in resumed.items():
            # Same processes, same reductions: only a lost weight or optimizer state could move these.
            assert loss == pytest.approx(uninterrupted[step], rel=1e-6, abs=1e-7), (kind, step)


def test_full_checkpoint_is_one_file_and_sharded_one_folder_of_rank_files(fsdp: Path) -> None:
    full = fsdp / "full_ckpt" / "epoch=5-step=6.ckpt"
    state = torch.load(full, map_location="cpu", weights_only=True)["state_dict"]
    config = steps.tiny_engram_config()
    table = state["model.layers.1.engram.table.weight"]
    assert table.shape == EngramGPT(config).layers[1].engram.table.weight.shape  # whole, not a shard
    sharded = fsdp / "sharded_ckpt" / "epoch=5-step=6.ckpt"
    assert sharded.is_dir()
    assert {p.name for p in sharded.iterdir()} == {".metadata", "meta.pt", "__0_0.distcp", "__1_0.distcp"}
    meta = torch.load(sharded / "meta.pt", map_location="cpu", weights_only=True)
    assert meta["global_step"] == steps.STEPS and "state_dict" not in meta  # weights live in the .distcp files


def test_exported_model_loads_in_one_process_with_the_trained_weights(fsdp: Path, one_process) -> None:
    exported = load_gpt(fsdp / "full" / "model")
    state = torch.load(fsdp / "full_ckpt" / "epoch=5-step=6.ckpt", map_location="cpu", weights_only=True)
    trained = EngramGPT(steps.tiny_engram_config()).eval()
    trained.load_state_dict({k.removeprefix("model."): v for k, v in state["state_dict"].items()})
    tokens = torch.randint(0, 16, (3, 15), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2, 3])
    with torch.no_grad():
        logits = exported(tokens, labels)
        assert torch.equal(logits, trained(tokens, labels))
        _, reference = one_process
        torch.testing.assert_close(logits, reference(tokens, labels), rtol=1e-4, atol=1e-5)
    assert logits.std() > 0.01  # the head is no longer its zero init


def test_host_tables_are_refused_before_wrapping() -> None:
    from train.strategies import check_host_tables

    model = EngramGPT(steps.tiny_engram_config("host"))
    for device in (torch.device("cpu"), torch.device("cuda", 0)):
        with pytest.raises(ValueError, match="table_device: device") as error:
            check_host_tables(model, device)
        assert "layers.1.engram.table" in str(error.value)
    check_host_tables(EngramGPT(steps.tiny_engram_config()), torch.device("cpu"))  # device tables pass


def test_optimizer_groups_see_the_shapes_the_model_was_built_with() -> None:
    from engram_vision.param_groups import param_groups
    from train.strategies import original_shapes

    model = EngramGPT(steps.tiny_engram_config())
    shapes = {id(p): p.shape for p in model.parameters()}
    built = {g["name"]: len(g["params"]) for g in param_groups(model, 1e-3, 0.05)}
    flat = {}
    for param in model.parameters():  # what FSDP (use_orig_params) leaves: a 1D slice of each parameter
        flat[id(param)] = param.data = param.data.reshape(-1)[: max(1, param.numel() // 2)].clone()
    assert {g["name"]: len(g["params"]) for g in param_groups(model, 1e-3, 0.05)}["decay"] == 0
    with original_shapes(model, shapes):
        assert {g["name"]: len(g["params"]) for g in param_groups(model, 1e-3, 0.05)} == built
    assert built["decay"] > 0  # and every parameter has its own data back:
    assert all(p.data_ptr() == flat[id(p)].data_ptr() and p.shape == flat[id(p)].shape for p in model.parameters())

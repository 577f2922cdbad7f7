"""Two-process DDP on CPU (gloo) through the real entry point: `python -m src.train trainer=ddp ...`.

The run also accumulates gradients over two batches (DDP's no_sync with static_graph) and checkpoints
the UNet's activations (non-reentrant), the settings a memory-bound multi-GPU run uses.

The run uses Lightning's own `ddp` strategy, which re-launches `python -m src.train` for rank 1 (with the
Hydra run directory of rank 0). `RecordRanks`, added with a `+callbacks.` override, writes what every
rank saw and ended with; the test asserts the ranks read disjoint halves of the data in equal numbers,
ended with identical trained tensors, and that rank 0 alone wrote the checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
ACCUMULATE = 2
STEPS = 2  # optimizer steps; each rank reads its own demo train shards: 4 batches of 4
BATCHES = STEPS * ACCUMULATE


class RecordRanks(pl.Callback):
    """Write `keys_rank<r>.json` (training sample keys in order) and `trained_rank<r>.pt` (trained tensors)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.keys: list[str] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.keys.extend(batch["key"])

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        (self.out_dir / f"keys_rank{rank}.json").write_text(json.dumps(self.keys))
        trained = {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}
        torch.save(
            {"world_size": trainer.world_size, "trained": trained}, self.out_dir / f"trained_rank{rank}.pt"
        )


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory, offline_cache: Path) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    command = [
        sys.executable,
        "-m",
        "src.train",
        "debug=default",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        f"trainer.max_steps={STEPS}",
        f"trainer.accumulate_grad_batches={ACCUMULATE}",
        f"trainer.val_check_interval={BATCHES}",
        "data.batch_size=4",
        f"callbacks.checkpoint.every_n_train_steps={STEPS}",
        "module.memory.gradient_checkpointing=true",
        "logger=csv",
        "~callbacks.samples",
        "~callbacks.energy",
        f"hydra.run.dir={out}",
        f"+callbacks.record._target_={__name__}.RecordRanks",
        f"+callbacks.record.out_dir={out}/ranks",
    ]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
        OFT_CONTROL_CACHE=str(offline_cache),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.mark.slow
def test_ranks_read_disjoint_equal_halves_of_the_data(ddp_run):
    keys = [json.loads((ddp_run / "ranks" / f"keys_rank{r}.json").read_text()) for r in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == BATCHES * 4
    assert not set(keys[0]) & set(keys[1])
    assert len(set(keys[0]) | set(keys[1])) == 2 * BATCHES * 4  # no sample read twice across ranks


@pytest.mark.slow
def test_trained_tensors_are_identical_across_ranks(ddp_run):
    states = [torch.load(ddp_run / "ranks" / f"trained_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert states[0]["world_size"] == states[1]["world_size"] == 2
    first, second = states[0]["trained"], states[1]["trained"]
    assert set(first) == set(second)
    assert any(name.startswith("encoder.") for name in first) and any("oft_skew" in name for name in first)
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name
    assert any(tensor.abs().sum() > 0 for name, tensor in first.items() if "oft_skew" in name)


@pytest.mark.slow
def test_one_checkpoint_with_the_trained_tensors(ddp_run):
    checkpoints = sorted(p.name for p in (ddp_run / "checkpoints").glob("*.ckpt"))
    assert checkpoints == ["last.ckpt", f"step_{STEPS:06d}.ckpt"]
    saved = torch.load(ddp_run / "checkpoints" / "last.ckpt", weights_only=True)
    trained = torch.load(ddp_run / "ranks" / "trained_rank0.pt", weights_only=True)["trained"]
    assert saved["global_step"] == STEPS and set(saved["state_dict"]) == set(trained)
    for name, tensor in trained.items():
        assert torch.equal(saved["state_dict"][name], tensor), name

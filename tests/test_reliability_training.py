"""Crashes cost at most the last checkpoint interval: atomic saves, kill -9 and resume, non-finite losses."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import compose_config

from src.models.checkpoint import AtomicCheckpointIO, atomic_torch_save
from src.train import build_run

ROOT = Path(__file__).resolve().parents[1]


def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"global_step": 1, "w": torch.ones(3)}, path)

    def crash_midway(payload, handle):
        handle.write(b"\x80\x02partial")  # a few bytes reach the disk, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"global_step": 2}, path)
    monkeypatch.undo()
    restored = torch.load(path, weights_only=True)
    assert restored["global_step"] == 1 and torch.equal(restored["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_trainer_uses_atomic_checkpoint_io(short_fit):
    assert isinstance(short_fit.run.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def _train_until_killed(out: Path, min_step: int) -> None:
    """Run `python -m src.train` in a subprocess and SIGKILL it once a checkpoint at `min_step` exists."""
    args = [
        sys.executable,
        "-m",
        "src.train",
        "debug=default",
        "trainer.max_steps=400",
        "trainer.val_check_interval=1000",
        "callbacks.checkpoint.every_n_train_steps=2",
        f"hydra.run.dir={out}",
    ]
    proc = subprocess.Popen(
        args, cwd=ROOT, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "checkpoints" / f"step_{min_step:06d}.ckpt").exists():
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"training exited early: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_kill_minus_nine_then_resume_restores_step_optimizer_and_weights(tmp_path):
    out = tmp_path / "killed"
    _train_until_killed(out, min_step=4)
    last = out / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)  # complete and loadable despite the kill
    assert saved["global_step"] >= 2  # last.ckpt may trail the newest step file by one interval

    cfg = compose_config(
        "debug=default", f"trainer.max_steps={saved['global_step'] + 2}", output_dir=tmp_path / "resumed"
    )
    run = build_run(cfg)
    restored = {}

    class Capture(pl.Callback):
        def on_train_start(self, trainer, module):
            optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())  # live tensors move on
            restored.update(
                step=trainer.global_step,
                optimizer=optimizer,
                weights={k: v.clone() for k, v in module.state_dict().items()},
            )

    run.trainer.callbacks.append(Capture())
    run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=str(last), weights_only=True)
    assert restored["step"] == saved["global_step"]
    for key, value in saved["state_dict"].items():
        assert torch.equal(restored["weights"][key], value), key
    saved_state = saved["optimizer_states"][0]["state"]
    assert saved_state and set(restored["optimizer"]["state"]) == set(saved_state)
    for index, state in saved_state.items():
        for name, value in state.items():
            assert torch.equal(
                torch.as_tensor(restored["optimizer"]["state"][index][name]), torch.as_tensor(value)
            )
    assert run.trainer.global_step == saved["global_step"] + 2


def _nan_loss_for(module, bad_batches: set[int]):
    """Make `diffusion_loss` return NaN (still attached to the graph) for the given batch indices."""
    real, calls = module.diffusion_loss, {"n": 0}

    def patched(*args, **kwargs):
        loss = real(*args, **kwargs)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] - 1 in bad_batches else loss

    module.diffusion_loss = patched


def test_nonfinite_loss_skips_the_step_and_is_counted(config_factory):
    run = build_run(config_factory("debug=default", "trainer.val_check_interval=100"))
    _nan_loss_for(run.module, {1, 2})
    snapshots = []

    class Snapshot(pl.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            snapshots.append(
                {k: v.clone() for k, v in module.state_dict().items() if k.startswith("encoder.")}
            )

    run.trainer.callbacks.append(Snapshot())
    run.trainer.fit(run.module, datamodule=run.datamodule)
    # Lightning still counts the batch as a step, but no gradient exists, so nothing is updated
    assert run.trainer.global_step == 4 and len(snapshots) == 4
    assert run.module.nonfinite_steps == 2
    for before, after in ((snapshots[0], snapshots[1]), (snapshots[1], snapshots[2])):
        assert all(torch.equal(before[k], after[k]) for k in before)  # NaN batches left the weights alone
    assert run.trainer.callback_metrics["train/nonfinite_steps"] == 2
    assert all(torch.isfinite(v).all() for v in run.module.state_dict().values())


def test_repeated_nonfinite_losses_stop_the_run_with_a_clear_error(config_factory):
    run = build_run(config_factory("debug=default", "module.max_consecutive_nonfinite=3"))
    _nan_loss_for(run.module, set(range(100)))
    with pytest.raises(
        FloatingPointError, match="3 non-finite losses in a row .*max_consecutive_nonfinite=3"
    ):
        run.trainer.fit(run.module, datamodule=run.datamodule)


def test_checkpoint_with_nonfinite_weights_is_refused(config_factory):
    run = build_run(config_factory("debug=default"))
    with torch.no_grad():
        run.module.encoder.zero_out.bias[0] = float("inf")
    checkpoint = {"state_dict": run.module.state_dict()}
    with pytest.raises(FloatingPointError, match="encoder.zero_out.bias"):
        run.module.on_save_checkpoint(checkpoint)

"""Errors users cause are one line on stderr and exit status 2 in every entry point (the traceback behind
`--debug`); a checkpoint's task is part of its identity; evaluation on nothing fails with valid JSON; two
trainings never share a run directory, and a killed run's temporaries go on the next start.

Every hostile input is built here, in a temporary folder.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import STEPS, compose_config, good_members, run_module, write_shard
from PIL import Image

from src.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    InputError,
    OFTControlError,
    find_user_error,
    one_line,
)
from src.evaluate import evaluate
from src.export import export
from src.generate import generate
from src.locks import LOCK_NAME, FolderLockedError
from src.models.checkpoint import CHECKPOINT_META, CheckpointMismatchError
from src.models.run import load_run
from src.train import build_run, train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    """The single `error: ...` line of a failed entry point: exit status 2, no traceback, stderr's last line."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and errors == lines[-1:], done.stderr[-3000:]
    return errors[0]


def _refuse_weights(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the error was found")

    monkeypatch.setattr("src.models.module.load_backbone", refuse)


def _saved(payload: object) -> bytes:
    """The bytes `torch.save` writes for `payload` (with a pickled object: code that must never run)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


@pytest.fixture
def copied_run(trained_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


# ------------------------------------------------------------------------ item 8: one line, exit 2
def test_resolution_not_a_multiple_of_the_vae_factor_fails_before_the_model_loads(
    config_factory, monkeypatch
):
    _refuse_weights(monkeypatch)
    with pytest.raises(
        ConfigError, match="model.resolution=100 is not a multiple of the VAE's downsampling factor 8"
    ):
        train(config_factory("model.resolution=100"))


def test_train_reports_a_user_error_in_one_line_and_debug_shows_the_traceback(tmp_path: Path):
    args = ("model.resolution=100", f"hydra.run.dir={tmp_path / 'run'}")
    line = _one_error_line(run_module("src.train", *args))
    assert line.startswith("error: model.resolution=100 is not a multiple of the VAE's downsampling factor 8")
    debug = run_module("src.train", *args, "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_random_or_truncated_checkpoints_never_show_the_weights_only_advice(
    copied_run, tmp_path, config_factory
):
    last = copied_run / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    cases = {
        "random": (
            np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
            "truncated or corrupt",
        ),
        "truncated": (data[: len(data) // 2], "truncated or corrupt"),
        "code": (_saved({"state_dict": {}, "x": ConfigError("pickled")}), "objects other than tensors"),
    }
    attempts = (
        lambda bad: load_run(copied_run, bad),  # generate, evaluate, app
        lambda bad: export(copied_run, tmp_path / f"export-{bad.stem}", checkpoint=str(bad)),
        lambda bad: build_run(config_factory(f"ckpt_path={bad}")),  # resume
    )
    for name, (content, kind) in cases.items():
        bad = copied_run / "checkpoints" / f"{name}.ckpt"
        bad.write_bytes(content)
        for attempt in attempts:
            with pytest.raises(CheckpointError) as info:
                attempt(bad)
            message = one_line(info.value)
            assert f"'{bad}' is not a readable PyTorch checkpoint" in message and kind in message
            assert "weights_only" not in message and "\n" not in str(info.value)
    last.write_bytes(cases["random"][0])
    line = _one_error_line(
        run_module("src.export", "--run", str(copied_run), "--out_dir", str(tmp_path / "exported"))
    )
    assert "is not a readable PyTorch checkpoint" in line and "weights_only" not in line
    assert not (tmp_path / "exported").exists()


def test_a_non_image_condition_file_is_one_line_before_the_model_loads(trained_run, tmp_path, monkeypatch):
    text = tmp_path / "edges.png"
    text.write_text("this is not an image")
    monkeypatch.setattr("src.generate.load_controlled", lambda *a, **k: pytest.fail("model loaded"))
    cfg = compose_config(
        f"run={trained_run}", f"condition={text}", "prompt=x", name="generate", output_dir=tmp_path
    )
    with pytest.raises(InputError, match=f"condition file '{text}' is not a readable image"):
        generate(cfg)
    args = (f"run={trained_run}", f"condition={text}", "prompt=x", f"hydra.run.dir={tmp_path / 'out'}")
    line = _one_error_line(run_module("src.generate", *args))
    assert line.startswith(f"error: condition file '{text}' is not a readable image")
    assert not (tmp_path / "out" / "images").exists()


def test_user_errors_wrapped_by_hydra_instantiate_are_still_one_line(config_factory):
    with pytest.raises(Exception) as info:
        train(config_factory("data=shards", "data.train_shards=x", "data.batch_size=0"))
    found = find_user_error(info.value)
    assert isinstance(found, OFTControlError) and one_line(found) == "data.batch_size must be >= 1, got 0"


# --------------------------------------------------------------------- item 6: task in the identity
def _with_condition(run: Path, condition: str | None) -> Path:
    path = run / "checkpoints" / f"task-{condition}.ckpt"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint[CHECKPOINT_META]["condition"] == "canny"  # what a run records
    if condition is None:
        del checkpoint[CHECKPOINT_META]["condition"]  # a checkpoint from before the field existed
    else:
        checkpoint[CHECKPOINT_META]["condition"] = condition
    torch.save(checkpoint, path)
    return path


def test_a_checkpoint_of_another_task_is_refused_for_resume_generate_and_export(
    copied_run, tmp_path, config_factory
):
    seg = _with_condition(copied_run, "seg")
    message = "trained on condition 'seg' but the run's config.yaml says 'canny'"
    with pytest.raises(CheckpointMismatchError, match=message):
        load_run(copied_run, seg)
    image = tmp_path / "edges.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(image)
    overrides = (f"run={copied_run}", f"checkpoint={seg}", f"condition={image}", "prompt=a red circle")
    cfg = compose_config(*overrides, name="generate", output_dir=tmp_path / "g")
    with pytest.raises(CheckpointMismatchError, match=message):
        generate(cfg)
    assert not (tmp_path / "g" / "images").exists()
    with pytest.raises(CheckpointMismatchError, match=message):
        export(copied_run, tmp_path / "exported", checkpoint=str(seg))
    with pytest.raises(
        CheckpointMismatchError, match="trained on condition 'seg' but this run's config says 'canny'"
    ):
        build_run(config_factory(f"ckpt_path={seg}"))


def test_a_checkpoint_from_before_task_identities_loads_with_a_warning(copied_run, caplog):
    old = _with_condition(copied_run, None)
    with caplog.at_level(logging.WARNING, "src.models.checkpoint"):
        run = load_run(copied_run, old)
    assert run.condition == "canny" and "predates task identities" in caplog.text
    assert "condition 'canny'" in caplog.text


# -------------------------------------------------------------------- item 7: evaluation on nothing
def test_evaluation_on_nothing_fails_and_writes_strict_json(trained_run, tmp_path):
    good = good_members(0)
    write_shard(tmp_path / "bad-000000.tar", {"a": {**good, "jpg": b"garbage"}, "b": {**good, "jpg": b""}})
    shards = str(tmp_path / "bad-*.tar")
    cfg = compose_config(
        f"run={trained_run}", f"shards={shards}", name="evaluate", output_dir=tmp_path / "in"
    )
    with pytest.raises(DataError, match="nothing was evaluated: no readable sample in 1 shard"):
        evaluate(cfg)

    def no_nan(constant):
        raise AssertionError(f"metrics.json holds {constant}, which is not JSON")

    report = json.loads((tmp_path / "in" / "metrics.json").read_text(), parse_constant=no_nan)
    assert report["samples"] == 0 and report["skipped"] == {"undecodable_image": 1, "empty_member": 1}
    assert report["metrics"]["canny_f1"] is None and report["metrics"]["canny_iou"] is None
    args = (f"run={trained_run}", f"shards={shards}", f"sampling.num_inference_steps={STEPS}")
    line = _one_error_line(run_module("src.evaluate", *args, f"hydra.run.dir={tmp_path / 'out'}"))
    assert line.startswith("error: nothing was evaluated: no readable sample in 1 shard(s)")
    json.loads((tmp_path / "out" / "metrics.json").read_text(), parse_constant=no_nan)


# ------------------------------------------------------------------- run directory, leftovers
def test_a_second_training_in_one_run_directory_is_refused_and_a_killed_runs_leftovers_go(
    tmp_path, config_factory, monkeypatch, caplog
):
    out = tmp_path / "run"
    args = [
        "debug=default",
        "trainer.max_steps=100000",
        "trainer.val_check_interval=100000",
        f"hydra.run.dir={out}",
    ]
    log = (tmp_path / "first.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "src.train", *args], cwd=ROOT, env=ENV, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 240
        while not (out / LOCK_NAME).exists() or not (out / LOCK_NAME).read_text().startswith(f"{proc.pid}\n"):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first training never locked its run directory"
            time.sleep(0.2)
        from src import train as entry

        monkeypatch.setattr(entry, "build_run", lambda cfg: pytest.fail("the second run was built"))
        with pytest.raises(
            FolderLockedError, match=f"in use by process {proc.pid} \\(training: python -m src.train"
        ):
            entry.train(config_factory("debug=fdr", output_dir=out))
        monkeypatch.undo()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
    orphans = [
        out / "weights" / ".last.safetensors.k1ll3d.tmp",
        out / "checkpoints" / ".last.ckpt.k1ll3d.tmp",
    ]
    for orphan in orphans:
        orphan.parent.mkdir(exist_ok=True)
        orphan.write_bytes(b"half a checkpoint")
    with caplog.at_level(logging.WARNING):
        metrics = train(config_factory("debug=fdr", output_dir=out))  # the next start in that directory
    assert "train/loss" in metrics and not any(orphan.exists() for orphan in orphans)
    assert (
        f"of process {proc.pid} (no longer running)" in caplog.text
        and "left behind by a run killed" in caplog.text
    )
    assert not (out / LOCK_NAME).exists()

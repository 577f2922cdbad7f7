"""Sweeps: the summary written from the jobs' records, the Hydra callback, a real multirun and Optuna."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import open_dict, read_write

from src.callbacks.sweep_summary import JOB_FILE, SweepSummary, final_metrics, write_summary
from src.sweep import main

ROOT = Path(__file__).resolve().parents[1]
QUICK = [
    "debug=default",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "logger=csv",
    "~callbacks.samples",
    "~callbacks.energy",
]


def _fake_job(
    sweep: Path,
    num: int,
    overrides: list[str],
    value: float | None,
    status: str = "COMPLETED",
    val_losses: tuple[float, ...] = (),
) -> Path:
    job = sweep / str(num)
    (job / "csv").mkdir(parents=True)
    record = {
        "num": num,
        "overrides": overrides,
        "status": status,
        "metric": "val/loss",
        "value": value,
        "error": None if status == "COMPLETED" else "RuntimeError: boom",
    }
    (job / JOB_FILE).write_text(json.dumps(record))
    rows = ["epoch,step,train/loss,val/loss"] + [
        f"0,{i},{1.5 - i / 10},{v}" for i, v in enumerate(val_losses)
    ]
    (job / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    return job


def test_summary_tables_every_job_and_names_the_best(tmp_path):
    _fake_job(tmp_path, 0, ["task=canny", "oft.block_size=16"], 0.5, val_losses=(0.7, 0.5))
    _fake_job(tmp_path, 1, ["task=canny", "oft.block_size=32"], 0.25, val_losses=(0.6, 0.25))
    _fake_job(tmp_path, 2, ["task=canny", "oft.block_size=64"], None, status="FAILED")
    markdown = write_summary(tmp_path).read_text()
    assert "Overrides of every job: `task=canny`" in markdown
    assert "| 1 | 1 | oft.block_size=32 | COMPLETED | 0.25 | 1.4 |" in markdown
    assert "| 2 | 2 | oft.block_size=64 | FAILED |" in markdown
    assert "Best: job 1 (`oft.block_size=32`), val/loss = 0.25" in markdown
    with (tmp_path / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["overrides"] for r in rows] == [f"task=canny oft.block_size={b}" for b in (16, 32, 64)]
    assert rows[0]["val/loss"] == "0.5" and rows[0]["train/loss"] == "1.4"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best"]["num"] == 1 and summary["jobs"][2]["error"] == "RuntimeError: boom"


def test_summary_cli_and_maximize(tmp_path, capsys):
    _fake_job(tmp_path, 0, ["optim.lr=1e-5"], 0.5)
    _fake_job(tmp_path, 1, ["optim.lr=1e-4"], 0.25)
    main(["--sweep_dir", str(tmp_path), "--maximize"])
    assert "Best: job 0 (`optim.lr=1e-5`)" in capsys.readouterr().out


def test_summary_of_a_directory_without_jobs_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        write_summary(tmp_path)


def test_final_metrics_are_the_last_logged_values(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/loss,val/loss\n0,0,2.0,\n0,1,1.0,\n0,1,,3.0\n0,2,nan,\n")
    assert final_metrics(path) == {"train/loss": 1.0, "val/loss": 3.0}
    assert final_metrics(tmp_path / "missing.csv") == {}


@pytest.mark.parametrize("mode", ["MULTIRUN", "RUN"])
def test_callback_records_multirun_jobs_only(config_factory, tmp_path, mode):
    cfg = config_factory(f"hydra.mode={mode}", "oft.block_size=16")
    job_dir = tmp_path / "sweep" / "3"
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.runtime.output_dir = str(job_dir)
        cfg.hydra.job.num = 3
        cfg.hydra.sweep.dir = str(tmp_path / "sweep")
    HydraConfig.instance().set_config(cfg)
    callback = SweepSummary()
    callback.on_job_end(cfg, JobReturn(status=JobStatus.COMPLETED, _return_value=0.125))
    if mode == "RUN":
        assert not (job_dir / JOB_FILE).exists()
        return
    record = json.loads((job_dir / JOB_FILE).read_text())
    assert record | {"overrides": None} == {
        "num": 3,
        "overrides": None,
        "status": "COMPLETED",
        "metric": "val/loss",
        "value": 0.125,
        "error": None,
    }
    assert "oft.block_size=16" in record["overrides"]
    callback.on_multirun_end(cfg)
    assert "| 3 | 3 |" in (tmp_path / "sweep" / "summary.md").read_text()


def test_failed_job_is_recorded_with_its_error(config_factory, tmp_path):
    cfg = config_factory("hydra.mode=MULTIRUN")
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.runtime.output_dir = str(tmp_path / "0")
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    SweepSummary().on_job_end(cfg, JobReturn(status=JobStatus.FAILED, _return_value=ValueError("bad lr")))
    record = json.loads((tmp_path / "0" / JOB_FILE).read_text())
    assert (record["status"], record["value"], record["error"]) == ("FAILED", None, "ValueError: bad lr")


def test_direction_is_validated():
    with pytest.raises(ValueError, match="'up'"):
        SweepSummary(direction="up")


def _multirun(args: list[str], sweep_dir: Path, cache: Path) -> None:
    command = [sys.executable, "-m", "src.train", *args, *QUICK, f"hydra.sweep.dir={sweep_dir}"]
    env = dict(os.environ, OFT_CONTROL_CACHE=str(cache), HF_HUB_OFFLINE="1")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.slow
def test_multirun_over_two_block_sizes_writes_two_runs_and_the_summary(tmp_path, offline_cache):
    sweep = tmp_path / "sweep"
    _multirun(["-m", "task=canny", "oft.block_size=16,32"], sweep, offline_cache)
    summary = json.loads((sweep / "summary.json").read_text())
    assert [job["dir"] for job in summary["jobs"]] == ["0", "1"]
    for job, block_size in zip(summary["jobs"], (16, 32), strict=True):
        run = sweep / job["dir"]
        assert f"oft.block_size={block_size}" in job["overrides"] and job["status"] == "COMPLETED"
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert f"block_size: {block_size}" in (run / "config.yaml").read_text()
        assert job["value"] == pytest.approx(final_metrics(run / "csv" / "metrics.csv")["val/loss"])
    assert summary["best"]["value"] == min(job["value"] for job in summary["jobs"])
    markdown = (sweep / "summary.md").read_text()
    assert "| 0 | 0 | oft.block_size=16 | COMPLETED |" in markdown
    assert "oft.block_size=32" in (sweep / "summary.csv").read_text()


@pytest.mark.slow
def test_optuna_sweep_of_two_trials_completes_offline(tmp_path, offline_cache):
    sweep = tmp_path / "optuna"
    _multirun(["hparams_search=optuna", "hydra.sweeper.n_trials=2"], sweep, offline_cache)
    results = (sweep / "optimization_results.yaml").read_text()
    summary = json.loads((sweep / "summary.json").read_text())
    assert len(summary["jobs"]) == 2 and all(job["status"] == "COMPLETED" for job in summary["jobs"])
    assert all(any(o.startswith("optim.lr=") for o in job["overrides"]) for job in summary["jobs"])
    assert f"best_value: {summary['best']['value']}" in results

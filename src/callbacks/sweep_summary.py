"""Sweep summary: a Hydra callback that tabulates the final metrics of every job of a multirun.

Registered in `conf/hydra/default.yaml`, so every `python -m src.train -m ...` (basic launcher, Optuna,
SLURM) ends with, in its sweep directory::

    summary.md    one row per job: its overrides, status, the optimized metric and the final logged metrics
    summary.csv   the same rows
    summary.json  {"metric": ..., "best": {...}, "jobs": [...]}

Each job records itself in `<job dir>/job_result.json` when it ends (`on_job_end`, in the job's own
process, on a SLURM node too), with the value `main` returned (`optimized_metric`); its other final
metrics are the last values in its `csv/metrics.csv` (logger `csv`, part of the default loggers). The
table is built from these files when the multirun ends, and can be rebuilt at any time (for example after
a failed or cancelled job) with `python -m src.sweep --sweep_dir <sweep dir>`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from src.errors import ConfigError, MissingInputError

log = logging.getLogger(__name__)

JOB_FILE = "job_result.json"
METRICS_CSV = Path("csv") / "metrics.csv"
SUMMARY = "summary"


def _number(value: Any) -> float | None:
    """A finite float, or None (missing, NaN or not a number)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def final_metrics(csv_path: Path) -> dict[str, float]:
    """The last logged value of every column of a Lightning `metrics.csv` (empty if there is none)."""
    if not csv_path.is_file():
        return {}
    last: dict[str, float] = {}
    with csv_path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            for name, value in row.items():
                number = _number(value) if value not in ("", None) else None
                if number is not None and name not in ("epoch", "step"):
                    last[name] = number
    return last


def job_record(config: DictConfig, job_return: JobReturn) -> dict[str, Any]:
    """What a job writes about itself: number, overrides, status, returned metric or error."""
    completed = job_return.status == JobStatus.COMPLETED
    outcome = job_return.return_value if completed else job_return._return_value
    return {
        "num": int(config.hydra.job.num),
        "overrides": list(config.hydra.overrides.task),
        "status": job_return.status.name,
        "metric": config.get("optimized_metric"),
        "value": _number(outcome) if completed else None,
        "error": None if completed else f"{type(outcome).__name__}: {outcome}",
    }


def _is_rank_zero() -> bool:
    from pytorch_lightning.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job's record under `sweep_dir`, with the final metrics of its metrics file, in job order."""
    rows = []
    for path in sweep_dir.glob(f"**/{JOB_FILE}"):
        record = json.loads(path.read_text())
        record["dir"] = str(path.parent.relative_to(sweep_dir))
        record["final"] = final_metrics(path.parent / METRICS_CSV)
        rows.append(record)
    return sorted(rows, key=lambda r: r["num"])


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value).replace("|", "\\|")


def common_overrides(jobs: list[dict[str, Any]]) -> list[str]:
    """Overrides every job shares (in the first job's order): the sweep's fixed settings."""
    shared = set.intersection(*(set(job["overrides"]) for job in jobs)) if jobs else set()
    return [o for o in jobs[0]["overrides"] if o in shared] if jobs else []


def summary_rows(
    jobs: list[dict[str, Any]], metric: str | None, hide: Iterable[str] = ()
) -> tuple[list[str], list[list[Any]]]:
    """Header and rows: job, directory, overrides (minus `hide`), status, the optimized metric, final metrics."""
    names = sorted({name for job in jobs for name in job["final"]} - {metric})
    header = ["job", "dir", "overrides", "status", metric or "value", *names]
    hidden = set(hide)
    rows = [
        [
            job["num"],
            job["dir"],
            " ".join(o for o in job["overrides"] if o not in hidden),
            job["status"],
            job["value"],
            *(job["final"].get(name) for name in names),
        ]
        for job in jobs
    ]
    return header, rows


def best_job(jobs: list[dict[str, Any]], direction: str = "minimize") -> dict[str, Any] | None:
    """The completed job with the best returned value (lowest when minimizing)."""
    scored = [job for job in jobs if job["value"] is not None]
    if not scored:
        return None
    sign = 1 if direction == "minimize" else -1
    return min(scored, key=lambda job: sign * job["value"])


def write_summary(sweep_dir: Path | str, metric: str | None = None, direction: str = "minimize") -> Path:
    """Write summary.md, summary.csv and summary.json into `sweep_dir`; returns the markdown path."""
    sweep_dir = Path(sweep_dir)
    jobs = collect(sweep_dir)
    if not jobs:
        raise MissingInputError(
            f"no {JOB_FILE} under sweep directory '{sweep_dir}': pass the directory of a multirun "
            "(outputs/<task>/multiruns/<date>) whose jobs ran with the SweepSummary callback"
        )
    metric = metric or next((job["metric"] for job in jobs if job["metric"]), None)
    header, rows = summary_rows(jobs, metric)
    best = best_job(jobs, direction)
    with (sweep_dir / f"{SUMMARY}.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    summary = {"metric": metric, "direction": direction, "best": best, "jobs": jobs}
    (sweep_dir / f"{SUMMARY}.json").write_text(json.dumps(summary, indent=1) + "\n")
    shared = common_overrides(jobs) if len(jobs) > 1 else []
    header, rows = summary_rows(jobs, metric, hide=shared)
    lines = [f"# Sweep {sweep_dir.name}: {len(jobs)} jobs, `{metric}` ({direction})", ""]
    if shared:
        lines += [f"Overrides of every job: `{' '.join(shared)}`", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    if best is not None:
        swept = " ".join(o for o in best["overrides"] if o not in shared)
        lines += ["", f"Best: job {best['num']} (`{swept}`), {metric} = {best['value']:.6g}"]
    markdown = sweep_dir / f"{SUMMARY}.md"
    markdown.write_text("\n".join(lines) + "\n")
    return markdown


class SweepSummary(Callback):
    """Hydra callback: each multirun job records its result; the multirun ends with the summary table.

    Args:
        direction: `minimize` or `maximize` the optimized metric when naming the best job.
    """

    def __init__(self, direction: str = "minimize") -> None:
        if direction not in ("minimize", "maximize"):
            raise ConfigError(f"SweepSummary direction {direction!r} must be 'minimize' or 'maximize'")
        self.direction = direction

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """In the job's process: write `job_result.json` (multirun jobs only, once per job: rank zero)."""
        if HydraConfig.get().mode != RunMode.MULTIRUN or not _is_rank_zero():
            return
        output_dir = Path(config.hydra.runtime.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / JOB_FILE).write_text(json.dumps(job_record(config, job_return), indent=1) + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """In the launching process, after every job returned: write the summary files."""
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            path = write_summary(sweep_dir, config.get("optimized_metric"), self.direction)
        except FileNotFoundError as err:
            log.warning("sweep summary not written: %s", err)
            return
        log.info("sweep summary: %s", path)

"""The controllability race: every method trained by the project's trainer on the toy world, with intervals.

    python -m benchmarks.controllability [--quick] [--no-write] [--jobs 2] [--threads 1] [--out DIR]
                                         [--model-path DIR] [--data-root DIR] [--report-only]

A thin driver over ``python -m src.train`` (``conf/experiment/race.yaml`` plus task, method, lr, seed, horizon
and validation shard per run), one process per run (one torch thread, ``--jobs`` at once) under ``--out``;
finished runs are not rerun, so a race resumes. Per row (task and a method of ``ROWS``, or an OFT-Control lever
of ``LEVERS``): (1) each lr of the grid trains ``select_steps`` (by default the reported horizon and
schedule), seed 0, scored on the selection conditions (shard 0), the grid extended beyond an end while the best
is there (``next_lr``); (2) on the first task, rows with two parameter groups train ``adapter_steps`` at the
chosen lr with one lr and with the adapter at lr / f and lr * f; (3) the chosen lr trains ``steps`` per seed on
the reported shard 1. ``benchmarks.race_report`` writes the table and plots
(benchmarks/README.md has the protocol and its time budget). ``--quick``: the phases in-process, tiny.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "outputs" / "race"
#: OFT-Control levers raced as rows: row -> (method, overrides); unshuffle widths: SD1.5's 320 by the rule
UNSHUFFLE = ("module.encoder_stem=unshuffle", "module.encoder_channels=[32,32,32,32]")
LEVERS = {
    "oft_more_layers": ("oft_control", ("oft=toy_more_layers",)),
    "oft_unshuffle": ("oft_control", UNSHUFFLE),
    "oft_unshuffle_more_layers": ("oft_control", (*UNSHUFFLE, "oft=toy_more_layers")),
}
ROWS = {
    "canny": ("oft_control", "encoder_only", "lora", "full_finetune", "controlnet", "t2i_adapter", *LEVERS),
    "segmentation": ("oft_control", "encoder_only", "lora", "controlnet", "t2i_adapter", *LEVERS),
}
#: methods with both an `encoder` and an `adapter` parameter group (src.models.methods)
TWO_GROUPS = ("oft_control", "lora", "full_finetune", "controlnet", *LEVERS)
SCORE = {"canny": "canny_f1", "segmentation": "seg_miou"}
SD15_WIDTH, SD15_ENCODER, SD15_EPS = 320, (16, 32, 96, 256), 1e-3


def toy_rule(toy_width: int = 32) -> dict:
    """The one rule carrying SD1.5's settings to the toy backbone: every added width times ``k`` = the toy UNet's
    first block width over SD1.5's (32 / 320); OFT keeps its number of blocks (so block sizes scale by ``k``)
    and ``eps`` scales by ``1 / k^2``, keeping each block's COFT radius ``eps b^2 / sqrt(r)``."""
    k = toy_width / SD15_WIDTH
    return {
        "k": k,
        "encoder_channels": [max(1, round(c * k)) for c in SD15_ENCODER],
        "eps": round(SD15_EPS / k**2, 12),
    }


@dataclass(frozen=True)
class Protocol:
    batch_size: int = 8
    steps: int = 3000  # the reported horizon
    eval_every: int = 1000
    select_steps: int = 3000  # each lr trained with the reported schedule (fewer: the schedule scaled)
    adapter_steps: int = 300  # the one-lr check of rows with an encoder and an adapter group
    seeds: tuple[int, ...] = (0, 1)
    grid: tuple[float, ...] = (1e-3, 10**-2.5, 1e-2)  # centred by the pilot (benchmarks/README.md)
    factor: float = math.sqrt(10)  # between neighbouring lrs, and the adapter-lr check's ratio
    max_extend: int = 3
    tasks: tuple[str, ...] = ("canny", "segmentation")
    adapter_check: bool = True
    extra: tuple[str, ...] = ()  # further overrides of every run (--quick: tiny data and sampler)


FULL = Protocol()
QUICK_OVERRIDES = (
    "data.root=${paths.data_dir}/race-quick data.prepare.train_scenes=16 data.prepare.val_scenes=8 "
    "data.prepare.shard_size=4 data.val_batch_size=4 callbacks.controllability.max_images=4 "
    "sampling.num_inference_steps=2 callbacks.samples=null callbacks.energy.neurons=4"
)
QUICK = Protocol(
    batch_size=2, steps=2, eval_every=1, select_steps=2, adapter_steps=1, grid=(1e-4, 1e-3, 1e-2)
)
QUICK = replace(QUICK, max_extend=1, extra=tuple(QUICK_OVERRIDES.split()))


@dataclass(frozen=True)
class Run:
    task: str
    method: str
    lr: float
    seed: int
    phase: str  # horizon (select at the reported horizon), select (at fewer steps), adapter, report
    steps: int
    eval_every: int
    adapter_lr: float | None = None

    @property
    def name(self) -> str:
        adapter = f"_alr{self.adapter_lr:.3g}" if self.adapter_lr else ""
        return f"{self.phase}/{self.task}/{self.method}/lr{self.lr:.3g}{adapter}_s{self.seed}"

    def overrides(self, protocol: Protocol) -> list[str]:
        shard = 1 if self.phase == "report" else 0
        channels = "".join(str(toy_rule()["encoder_channels"]).split())
        extra = f" method.conditioning_channels={channels}" if self.method == "controlnet" else ""
        extra += f" method.adapter_lr={self.adapter_lr!r}" if self.adapter_lr else ""
        method, preset = LEVERS.get(self.method, (self.method, ()))
        each = (
            f"experiment=race task={self.task} method={method} optim.lr={self.lr!r} seed={self.seed} "
            f"data.batch_size={protocol.batch_size} trainer.max_steps={self.steps} "
            f"trainer.val_check_interval={self.eval_every} callbacks.energy.every_n_steps={self.eval_every} "
            f"data.val_shards=${{data.root}}/${{task.condition}}/val-{shard:06d}.tar{extra}"
        )
        return [*each.split(), *preset, *protocol.extra]


def next_lr(scores: dict[float, float], factor: float) -> float | None:
    """The lr to try next: one step beyond the grid's end where the best score is at that end (the lower end
    on ties), else None (the best is inside the grid)."""
    grid = sorted(scores)
    best = max(grid, key=lambda lr: (scores[lr], -lr))
    return grid[0] / factor if best == grid[0] else grid[-1] * factor if best == grid[-1] else None


def run_score(run_dir: Path, task: str) -> float:
    from benchmarks.race_report import last_conditions  # the mean per-condition score, last evaluation

    values = last_conditions(run_dir)[SCORE[task]]
    return float(sum(values) / len(values))


@dataclass
class Row:
    task: str  # one (task, method)'s selection state
    method: str
    scores: dict[float, float] = field(default_factory=dict)
    tried: list[float] = field(default_factory=list)
    chosen: float | None = None
    at_edge: bool = False


class Race:
    def __init__(self, protocol: Protocol, out: Path, args: argparse.Namespace) -> None:
        self.protocol, self.out, self.args = protocol, out, args
        self.rows = {(t, m): Row(t, m) for t in protocol.tasks for m in ROWS[t]}
        self.runs, self.started, self.command = [], time.monotonic(), "python -m benchmarks.controllability"

    def base_overrides(self) -> list[str]:
        paths = [f"model.path={self.args.model_path}"] if self.args.model_path else []
        return paths + ([f"data.root={self.args.data_root}"] if self.args.data_root else [])

    def select_run(self, row: Row, lr: float) -> Run:
        row.tried.append(lr)
        p = self.protocol
        phase = "horizon" if p.select_steps == p.steps else "select"  # their own folders
        return Run(row.task, row.method, lr, p.seeds[0], phase, p.select_steps, p.select_steps)

    def first_runs(self) -> list[Run]:
        return [self.select_run(row, lr) for row in self.rows.values() for lr in self.protocol.grid]

    def finished(self, run: Run, score: float) -> list[Run]:
        """Record a finished run; the runs it makes due."""
        p, row = self.protocol, self.rows[(run.task, run.method)]
        if run.phase not in ("select", "horizon"):
            return []
        row.scores[run.lr] = score
        if len(row.scores) < len(row.tried):
            return []
        extensions = len(row.tried) - len(p.grid)
        following = next_lr(row.scores, p.factor)
        if following is not None and extensions < p.max_extend:
            return [self.select_run(row, following)]
        row.at_edge = following is not None
        row.chosen = max(sorted(row.scores), key=lambda lr: row.scores[lr])
        reports = [Run(run.task, run.method, row.chosen, s, "report", p.steps, p.eval_every) for s in p.seeds]
        check = p.adapter_check and run.method in TWO_GROUPS and run.task == p.tasks[0]
        adapter = [
            Run(run.task, run.method, row.chosen, p.seeds[0], "adapter", p.adapter_steps, p.adapter_steps, a)
            for a in (None, row.chosen / p.factor, row.chosen * p.factor)
        ]
        return reports + (adapter if check else [])

    def launch(self, run: Run) -> subprocess.Popen | bool:
        """Start a run: a process, or (inline) whether it trained; a failed selection run scores -inf."""
        folder = self.out / run.name
        shutil.rmtree(folder, ignore_errors=True)  # a killed run starts over
        folder.mkdir(parents=True)
        overrides = [*run.overrides(self.protocol), *self.base_overrides(), f"threads={self.args.threads}"]
        if self.args.inline:
            try:
                train_inline(overrides, folder)
            except Exception:
                if run.phase == "report":
                    raise
                return False
            return True
        log = (folder / "train.log").open("w")
        env = {**os.environ, "OMP_NUM_THREADS": str(self.args.threads)}
        command = [sys.executable, "-m", "src.train", *overrides, f"hydra.run.dir={folder}"]
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def done(self, run: Run, seconds: float | None, failed: bool = False) -> list[Run]:
        folder = self.out / run.name
        record = folder / "race_run.json"
        if seconds is not None:
            record.write_text(json.dumps({**asdict(run), "seconds": seconds, "failed": failed}) + "\n")
        info = {**json.loads(record.read_text()), "dir": run.name, "reused": seconds is None}
        info["score"] = -math.inf if info.get("failed") else run_score(folder, run.task)
        self.runs.append(info)
        self.record()  # after every run, so a stopped race can be reported (--report-only)
        print(f"[race] {run.name}: score {info['score']:.4f} ({info['seconds']:.0f} s)", flush=True)
        return self.finished(run, info["score"])

    @staticmethod
    def enqueue(queue: deque, runs: list[Run]) -> None:
        for run in sorted(runs, key=lambda r: r.phase == "report"):  # what a finished run makes due goes
            queue.appendleft(run)  # ahead of rows not started (reports first): rows finish in order

    def run_all(self) -> None:
        queue, running = deque(self.first_runs()), []
        while queue or running:
            while queue and len(running) < self.args.jobs:
                run = queue.popleft()
                record = self.out / run.name / "race_run.json"  # finished before with this config: resumed
                if record.is_file() and json.loads(record.read_text()).items() >= asdict(run).items():
                    self.enqueue(queue, self.done(run, None))
                    continue
                started = time.monotonic()
                process = self.launch(run)
                if not isinstance(process, subprocess.Popen):  # inline: it ran here
                    self.enqueue(queue, self.done(run, time.monotonic() - started, not process))
                else:
                    running.append((process, run, started))
            for entry in list(running):
                process, run, started = entry
                if process.poll() is None:
                    continue
                running.remove(entry)
                if process.returncode != 0 and run.phase == "report":  # a diverged lr trial scores -inf
                    for other, _, _ in running:
                        other.terminate()
                    log = self.out / run.name / "train.log"
                    raise RuntimeError(f"run {run.name} failed ({process.returncode}); see {log}")
                self.enqueue(queue, self.done(run, time.monotonic() - started, process.returncode != 0))
            if running:
                time.sleep(1.0)

    def record(self) -> dict:
        seconds, date = time.monotonic() - self.started, datetime.date.today().isoformat()
        race = dict(protocol=asdict(self.protocol), rule=toy_rule(), runs=self.runs, command=self.command)
        race |= dict(jobs=self.args.jobs, seconds=seconds, date=date)
        race["rows"] = [asdict(row) | {"scores": sorted(row.scores.items())} for row in self.rows.values()]
        (self.out / "race.json").write_text(json.dumps(race, indent=1) + "\n")
        return race


def train_inline(overrides: list[str], folder: Path, fit: bool = True):
    """``python -m src.train overrides`` in this process, writing to ``folder`` (--quick); with ``fit=False``
    only the composed config (``benchmarks.race_step``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from src.train import train

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(folder)
    HydraConfig.instance().set_config(cfg)
    return train(cfg) if fit else cfg


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="the tiny protocol in-process; no README")
    parser.add_argument("--no-write", action="store_true", help="leave benchmarks/README.md and plots alone")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", type=Path, default=None, help=f"race folder (default {DEFAULT_OUT})")
    parser.add_argument("--model-path", default=None, help="backbone folder (default: conf/model/toy.yaml)")
    parser.add_argument("--data-root", default=None, help="demo data root (default: the race's own)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from --out's runs")
    parser.add_argument("--inline", action="store_true", help="train in this process (--quick's default)")
    args = parser.parse_args(argv)
    protocol, args.inline = (QUICK, True) if args.quick else (FULL, args.inline)
    args.jobs = 1 if args.inline else args.jobs
    out = args.out or (DEFAULT_OUT.with_name("race-quick") if args.quick else DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    from benchmarks import race_report

    if args.report_only:
        race = json.loads((out / "race.json").read_text())
    else:
        race_ = Race(protocol, out, args)
        race_.command += " --quick" * args.quick
        race_.run_all()
        race = race_.record()
    result = race_report.report(race, out, write=not (args.quick or args.no_write))
    print(result["markdown"])
    return result


if __name__ == "__main__":
    main()

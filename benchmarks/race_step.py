"""The controllability race's training step: time per step and trainable parameters of every canny row.

    python -m benchmarks.race_step [--rounds 5] [--steps 20] [--threads 1] [--quick] [--no-write]

Each row of the race (``benchmarks.controllability``: the methods and the OFT-Control levers) is built exactly
as the race builds its reported canny run (``conf/experiment/race.yaml`` plus the row's overrides) and
trained by a Lightning trainer with the race's clipping, without validation, logging or checkpoints. A
callback times each training batch from ``on_train_batch_start`` to ``on_train_batch_end``: the forward with
the control, the backward, clipping, the optimizer step and the method's own extras (COFT's projection),
not the data loading. The rows run interleaved, ``--rounds`` rounds of ``--steps`` steps each (the first
step of every round is dropped as a warm-up), the order rotated every round, one torch thread by default
(as the race trains); the table shows each row's median step and the median of its per-round ratios to
ControlNet's. The section between the ``race_step`` markers of benchmarks/README.md is rewritten.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch

from benchmarks import readme
from benchmarks.controllability import FULL, QUICK, ROWS, Run, train_inline
from benchmarks.race_report import NAMES

START, END = "<!-- race_step:start -->", "<!-- race_step:end -->"
REFERENCE = "controlnet"


class StepTimer(pl.Callback):
    """Seconds per training batch, from its start to its end (the optimizer step included)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, *_args) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, *_args) -> None:
        self.seconds.append(time.perf_counter() - self.started)


def build(method: str, quick: bool, folder: Path) -> tuple[pl.LightningModule, pl.LightningDataModule, float]:
    """The row's module and data as the race's reported canny run composes them (its output folder `folder`,
    where nothing is written), and its clipping norm."""
    from hydra.utils import instantiate

    protocol = QUICK if quick else FULL
    run = Run("canny", method, 1e-3, 0, "report", protocol.steps, protocol.eval_every)
    cfg = train_inline(run.overrides(protocol), folder, fit=False)
    module = instantiate(cfg.module, condition=cfg.task.condition)
    return module, instantiate(cfg.data), cfg.trainer.gradient_clip_val


def time_rows(methods: list[str], rounds: int, steps: int, quick: bool) -> tuple[dict, dict]:
    """Per row, its median step (seconds) of every round, and its trainable parameters."""
    with tempfile.TemporaryDirectory(prefix="race_step-") as folder:
        built = {m: build(m, quick, Path(folder)) for m in methods}
    trainable = {m: sum(p.numel() for p in built[m][0].parameters() if p.requires_grad) for m in methods}
    medians: dict[str, list[float]] = {m: [] for m in methods}
    for round_ in range(rounds):
        for method in methods[round_ % len(methods) :] + methods[: round_ % len(methods)]:
            module, data, clip = built[method]
            timer = StepTimer()
            trainer = pl.Trainer(
                accelerator="cpu",
                max_steps=steps + 1,
                limit_val_batches=0,
                gradient_clip_val=clip,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=[timer],
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer.fit(module, datamodule=data)
            medians[method].append(statistics.median(timer.seconds[1:]))
    return medians, trainable


def table(methods: list[str], medians: dict[str, list[float]], trainable: dict[str, int]) -> list[str]:
    rows = [
        "| row | trainable | median step | vs ControlNet (median of per-round ratios) |",
        "|---|---:|---:|---:|",
    ]
    for method in methods:
        ratios = [a / b for a, b in zip(medians[method], medians[REFERENCE], strict=True)]
        step = statistics.median(medians[method]) * 1e3
        rows.append(
            f"| {NAMES[method]} | {trainable[method]:,} | {step:.1f} ms | {statistics.median(ratios):.2f}x |"
        )
    return rows


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row and round (default 20)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the race)")
    parser.add_argument("--quick", action="store_true", help="the race's tiny data, 2 rounds of 2 steps")
    parser.add_argument(
        "--no-write", action="store_true", help="print only, leave benchmarks/README.md alone"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):  # a fit per row and round
        logging.getLogger(name).setLevel(logging.ERROR)
    rounds, steps = (2, 2) if args.quick else (args.rounds, args.steps)
    methods = list(ROWS["canny"])
    medians, trainable = time_rows(methods, rounds, steps, args.quick)
    command = "python -m benchmarks.race_step" + (" --quick" if args.quick else "")
    head = (
        f"Measured {datetime.date.today().isoformat()} with `{command}` on {readme.machine()}, "
        f"{args.threads} torch thread(s): {rounds} interleaved rounds of {steps} steps per row (batch "
        f"{(QUICK if args.quick else FULL).batch_size}, the race's canny setting), median step over rounds."
    )
    body = "\n".join([head, "", *table(methods, medians, trainable)])
    print(body)
    if not (args.quick or args.no_write):
        readme.write_section(body, start=START, end=END)
    return body


if __name__ == "__main__":
    main()

"""Rewrite the summary of a Hydra sweep directory: `python -m src.sweep --sweep_dir DIR [--metric NAME] [--maximize]`.

Every multirun writes `summary.md`, `summary.csv` and `summary.json` into its sweep directory when it ends
(the `SweepSummary` Hydra callback, `src.callbacks.sweep_summary`); this rebuilds them from the jobs'
records, e.g. after a failed or cancelled job stopped the sweep. Options are named as the config keys of
the other entry points (`--sweep_dir` as `hydra.sweep.dir`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from src.callbacks.sweep_summary import write_summary
from src.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sweep_dir", type=Path, required=True, help="the multirun's directory (hydra.sweep.dir)"
    )
    parser.add_argument("--metric", default=None, help="name of the returned metric (default: from the jobs)")
    parser.add_argument("--maximize", action="store_true", help="higher is better when naming the best job")
    return parser


def main(argv: list[str] | None = None) -> Path:
    """Entry point of `python -m src.sweep`; prints the markdown summary and returns its path."""
    args = build_parser().parse_args(argv)
    path = write_summary(args.sweep_dir, args.metric, "maximize" if args.maximize else "minimize")
    print(path.read_text())
    return path


if __name__ == "__main__":
    run_cli(main)

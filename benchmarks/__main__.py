"""Run every benchmark script and rewrite its table in benchmarks/README.md.

    python -m benchmarks [--quick] [--no-write] [--threads N] [--only oft_layer,train_step,...]

The scripts are every public module of this package (``oft_layer``, ``train_step``, ``memory``, then
any other in name order). Each runs in its own interpreter (``python -m benchmarks.<name>``), one after
the other, so their thread settings and memory peaks do not mix, and rewrites its own section of the
README between its markers. Then the header (date, machine, load, commands) is rewritten between the header markers.
``--quick``, ``--no-write`` and ``--threads`` are passed to every script; a script that does not exist
yet is skipped with a message.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import pkgutil
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.readme import README, write_section

EXPECTED = ("oft_layer", "train_step", "memory")  # run first, in this order; a missing one is reported
HEADER_START, HEADER_END = "<!-- header:start -->", "<!-- header:end -->"
ROOT = Path(__file__).resolve().parents[1]


def script_command(name: str, args: argparse.Namespace) -> list[str]:
    """The command line that runs one benchmark script with the shared flags."""
    command = [sys.executable, "-m", f"benchmarks.{name}"]
    command += ["--quick"] if args.quick else []
    command += ["--no-write"] if args.no_write else []
    command += ["--threads", str(args.threads)] if args.threads else []
    return command


def scripts() -> list[str]:
    """Every public module of this package (each is a script with the shared flags), expected ones first."""
    found = sorted(
        m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_")
    )
    return [*EXPECTED, *(name for name in found if name not in EXPECTED)]


def available(name: str) -> bool:
    return importlib.util.find_spec(f"benchmarks.{name}") is not None


def header(entry: str, commands: list[str], seconds: float, load: tuple[float, float]) -> str:
    """The machine and the commands of the last run of the entry point."""
    import torch

    shown = "\n".join(f"    {c}" for c in commands)
    return (
        f"Last regenerated {datetime.date.today().isoformat()} by `{entry}`, which ran, one after the "
        f"other, in {seconds / 60:.0f} minutes:\n\n{shown}\n\n"
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU, "
        f"Python {platform.python_version()}, torch {torch.__version__}; shared with other jobs "
        f"(1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the end)."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smoke-run every script; nothing is written")
    parser.add_argument("--no-write", action="store_true", help="leave README.md alone")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for every script")
    parser.add_argument("--only", default="", help="comma-separated subset of " + ",".join(scripts()))
    args = parser.parse_args(argv)
    entry = " ".join(["python -m benchmarks", *(sys.argv[1:] if argv is None else argv)])
    names = [n for n in args.only.split(",") if n] or scripts()
    unknown = sorted(set(names) - set(scripts()))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {scripts()}")
    start, load_start, commands, failed = time.perf_counter(), os.getloadavg()[0], [], []
    for name in names:
        if not available(name):
            print(f"benchmarks.{name} does not exist yet: skipped", flush=True)
            continue
        command = script_command(name, args)
        print("$ " + " ".join(command[1:]), flush=True)
        if subprocess.run(command, cwd=ROOT).returncode:
            failed.append(name)
        commands.append(" ".join(["python", *command[1:]]))
    if not (args.quick or args.no_write or failed):
        write_section(
            header(entry, commands, time.perf_counter() - start, (load_start, os.getloadavg()[0])),
            README,
            HEADER_START,
            HEADER_END,
        )
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

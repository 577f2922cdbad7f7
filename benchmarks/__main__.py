"""Run every benchmark script and rewrite its table in benchmarks/README.md.

    python -m benchmarks [--quick] [--no-write] [--threads N] [--only oft_layer,train_step,...]

The scripts are the modules of this package that run as ``python -m benchmarks.<name>`` (those with a
``__main__`` block: ``oft_layer``, ``train_step``, ``memory``, then any other in name order; helpers such as
``readme`` are not scripts). Each runs in its own interpreter, one after the other, so their thread
settings and memory peaks do not mix, and rewrites its own section of the README between its markers,
stamped with its date, command and machine; the header's index of sections is regenerated from those
stamps (``benchmarks.readme``).
``--quick``, ``--no-write`` and ``--threads`` are passed to every script; a script that does not exist
yet is skipped with a message.
"""

from __future__ import annotations

import argparse
import importlib.util
import pkgutil
import subprocess
import sys
from pathlib import Path

EXPECTED = ("oft_layer", "train_step", "memory")  # run first, in this order; a missing one is reported
ROOT = Path(__file__).resolve().parents[1]


def script_command(name: str, args: argparse.Namespace) -> list[str]:
    """The command line that runs one benchmark script with the shared flags."""
    command = [sys.executable, "-m", f"benchmarks.{name}"]
    command += ["--quick"] if args.quick else []
    command += ["--no-write"] if args.no_write else []
    command += ["--threads", str(args.threads)] if args.threads else []
    return command


def is_script(name: str) -> bool:
    """A module of this package that runs as ``python -m benchmarks.<name>`` (it has a ``__main__`` block)."""
    return '__name__ == "__main__"' in (Path(__file__).parent / f"{name}.py").read_text()


def scripts() -> list[str]:
    """Every benchmark script of this package (each takes the shared flags), expected ones first."""
    found = sorted(
        m.name
        for m in pkgutil.iter_modules([str(Path(__file__).parent)])
        if not m.name.startswith("_") and is_script(m.name)
    )
    return [*EXPECTED, *(name for name in found if name not in EXPECTED)]


def available(name: str) -> bool:
    return importlib.util.find_spec(f"benchmarks.{name}") is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smoke-run every script; nothing is written")
    parser.add_argument("--no-write", action="store_true", help="leave README.md alone")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for every script")
    parser.add_argument("--only", default="", help="comma-separated subset of " + ",".join(scripts()))
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or scripts()
    unknown = sorted(set(names) - set(scripts()))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {scripts()}")
    failed = []
    for name in names:
        if not available(name):
            print(f"benchmarks.{name} does not exist yet: skipped", flush=True)
            continue
        command = script_command(name, args)
        print("$ " + " ".join(command[1:]), flush=True)
        if subprocess.run(command, cwd=ROOT).returncode:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

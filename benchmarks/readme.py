"""benchmarks/README.md: every script rewrites only its own section between its markers, and the index of
sections in the header is regenerated from the sections themselves, so it cannot go stale."""

from __future__ import annotations

import os
import re
from pathlib import Path

from src.machine import cpu_model

README = Path(__file__).with_name("README.md")
HEADER_START, HEADER_END = "<!-- header:start -->", "<!-- header:end -->"
SECTION = re.compile(r"<!-- (\w+):start -->\n(.*?)<!-- \1:end -->", re.S)
MEASURED = re.compile(
    r"Measured (\d{4}-\d{2}-\d{2}) with `([^`]+)`(?: in \S+ minutes)? on (\d+ CPU cores \([^,;)]*|[^,;(]+)"
)


def machine() -> str:
    """Where a figure was measured, for the line beside it: cores, CPU model and the GPU if one is used."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu_model()}), {gpu}"


def section_index(text: str) -> str:
    """A table of every section: when, with which command and on which machine it was last measured."""
    rows = ["| section | measured | command | machine |", "|---|---|---|---|"]
    for name, body in SECTION.findall(text):
        if name == "header":
            continue
        found = MEASURED.search(body)
        date, command, where = found.groups() if found else ("not yet", "", "")
        where = where.replace(" (", ", ").strip()
        rows.append(f"| {name} | {date} | {f'`{command}`' if command else ''} | {where} |")
    return (
        "Each section says when, with which command and on which machine its figures were measured; this\n"
        "index is regenerated from those lines whenever a script rewrites its section.\n\n" + "\n".join(rows)
    )


def replace_between(text: str, body: str, start: str, end: str) -> str:
    """``text`` with ``body`` between ``start`` and ``end`` (both markers appended if missing)."""
    if start not in text or end not in text:
        text = text.rstrip("\n") + f"\n\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{body}\n{end}{rest.split(end, 1)[1]}"


def write_section(body: str, path: Path = README, start: str = "", end: str = "") -> None:
    """Replace the text between ``start`` and ``end`` in ``path``, then regenerate the header's index."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    text = replace_between(text, body, start, end)
    if HEADER_START in text:
        text = replace_between(text, section_index(text), HEADER_START, HEADER_END)
    path.write_text(text)

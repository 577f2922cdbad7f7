"""benchmarks/README.md: every script rewrites only its own section between its markers."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).with_name("README.md")


def write_section(body: str, path: Path = README, start: str = "", end: str = "") -> None:
    """Replace the text between ``start`` and ``end`` in ``path`` (append both markers if missing)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start not in text or end not in text:
        text = text.rstrip("\n") + f"\n\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(f"{head}{start}\n{body}\n{end}{tail}")

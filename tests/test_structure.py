"""The layout keeps its promises: entry points are thin compositions of library modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
#: modules run as `python -m src.<name>`: those with a `__main__` block
ENTRY_POINTS = sorted(p.stem for p in SRC.glob("*.py") if '__name__ == "__main__"' in p.read_text())
MAX_LINES = 130  # "about 120": a thin composition, not a script


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "src":
                names |= {f"src.{alias.name}" for alias in node.names}
    return names


def test_entry_points_are_found():
    assert {"train", "generate", "evaluate", "export", "sweep"} <= set(ENTRY_POINTS)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_point_imports_no_other_entry_point_and_stays_thin(name):
    path = SRC / f"{name}.py"
    others = {f"src.{other}" for other in ENTRY_POINTS if other != name}
    assert not _imported_modules(path) & others, f"src/{name}.py imports another entry point"
    assert len(path.read_text().splitlines()) <= MAX_LINES, f"src/{name}.py is longer than {MAX_LINES} lines"

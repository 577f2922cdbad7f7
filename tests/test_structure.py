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


def test_src_never_imports_data_prep():
    """The dependency runs one way: the converters (data_prep) use the library (src), never the reverse;
    the toy world lives in src/toy, so nothing under src needs data_prep."""
    offenders = [
        str(path.relative_to(SRC.parent))
        for path in sorted(SRC.rglob("*.py"))
        if any(name == "data_prep" or name.startswith("data_prep.") for name in _imported_modules(path))
    ]
    assert not offenders, f"modules under src import data_prep: {offenders}"
    mentions = [str(p.relative_to(SRC.parent)) for p in SRC.rglob("*.py") if "data_prep" in p.read_text()]
    assert not mentions, f"src names data_prep (also in strings, e.g. dynamic imports): {mentions}"


def test_the_toy_world_has_one_home():
    """World, judge, backbone configs and pretraining are the modules of src/toy, and nowhere else."""
    toy = {p.stem for p in (SRC / "toy").glob("*.py")}
    assert {"world", "judge", "backbone", "pretrain"} <= toy
    for stray in ("metrics/toy.py", "models/pretrain.py"):
        assert not (SRC / stray).exists(), f"src/{stray} should live in src/toy"
    assert "TOY_" not in (SRC / "models" / "tiny.py").read_text()

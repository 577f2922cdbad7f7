"""The install paths agree with each other and with what the machine needs."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_requirements() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    expanded = set(project["dependencies"])
    for name in ("sweep", "dev"):
        expanded |= {req for req in extras[name] if not req.startswith("oft-control")}
    return {req.replace(" ", "") for req in expanded}


def _environment_requirements() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_block = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict))
    return {req.replace(" ", "") for req in pip_block if not req.startswith("--editable")}


def test_environment_yml_installs_what_pyproject_declares():
    assert _environment_requirements() == _pyproject_requirements()


def test_one_opencv_release_provides_cv2():
    """Every installed OpenCV distribution is the same release, so `cv2` is consistent whichever copy won."""
    import cv2

    versions = {}
    for dist in ("opencv-python", "opencv-python-headless", "opencv-contrib-python"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    assert versions, "no OpenCV distribution installed"
    assert {v.rsplit(".", 1)[0] for v in versions.values()} == {cv2.__version__}, versions

"""Shared test setup: offline hub, a per-session cache for the tiny backbone and demo data, config helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import compose_config

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the tests may reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def offline_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache per test session for the tiny backbone and demo shards (built on first use)."""
    cache = Path(os.environ.get("OFT_CONTROL_TEST_CACHE") or tmp_path_factory.mktemp("oft-control-cache"))
    os.environ["OFT_CONTROL_CACHE"] = str(cache)
    return cache


@pytest.fixture
def config_factory(tmp_path: Path):
    """`config_factory(*overrides)` composes the training config with its outputs under `tmp_path`."""

    def make(*overrides: str, output_dir: Path | None = None):
        return compose_config(*overrides, output_dir=output_dir or tmp_path / "run")

    return make

"""Shared test setup: offline hub, a per-session cache for the tiny backbone and demo data, config helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the tests may reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def offline_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache per test session for the tiny backbone and demo shards (built on first use)."""
    cache = Path(os.environ.get("OFT_CONTROL_TEST_CACHE") or tmp_path_factory.mktemp("oft-control-cache"))
    os.environ["OFT_CONTROL_CACHE"] = str(cache)
    return cache


def compose_config(*overrides: str, output_dir: Path | None = None):
    """Compose conf/train.yaml as `python -m src.train` would, with the Hydra runtime config set."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def config_factory(tmp_path: Path):
    """`config_factory(*overrides)` composes the training config with its outputs under `tmp_path`."""

    def make(*overrides: str, output_dir: Path | None = None):
        return compose_config(*overrides, output_dir=output_dir or tmp_path / "run")

    return make

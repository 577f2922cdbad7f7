"""Shared test setup: offline hub, a per-session cache for the tiny backbone and demo data, shared fixtures."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import compose_config, make_trained_run

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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of many tiny ops: no OpenMP contention on the shared 2-core machine.

    Use it with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def trained_run(offline_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory of the default config with perturbed trained tensors (`helpers.make_trained_run`)."""
    return make_trained_run(tmp_path_factory.mktemp("trained") / "run")


@dataclass
class ShortFit:
    """What one `train(cfg)` of `debug=default` (4 steps, validation at steps 2 and 4) left behind."""

    out: Path
    run: Any  # src.train.Run
    metrics: dict[str, float]
    trained_before: dict[str, torch.Tensor]
    generate_steps: list[int] = field(default_factory=list)  # global step of every `module.generate` call


@pytest.fixture(scope="session")
def short_fit(offline_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> ShortFit:
    """One short training run through `src.train.train`, shared by the tests that look at what a run does.

    The run `train` builds is captured (its trained tensors before fitting, and every `generate` call)
    without changing what `train` does.
    """
    from src import train as entry

    out = tmp_path_factory.mktemp("short_fit") / "run"
    captured: dict[str, Any] = {"steps": []}
    build_run = entry.build_run

    def capturing_build_run(cfg):
        run = build_run(cfg)
        trained = set(run.module.trainable_names())
        captured["before"] = {k: v.clone() for k, v in run.module.state_dict().items() if k in trained}
        generate = run.module.generate

        def counting_generate(*args, **kwargs):
            captured["steps"].append(run.module.global_step)
            return generate(*args, **kwargs)

        run.module.generate = counting_generate
        captured["run"] = run
        return run

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(entry, "build_run", capturing_build_run)
        metrics = entry.train(compose_config("debug=default", output_dir=out))
    return ShortFit(out, captured["run"], metrics, captured["before"], captured["steps"])

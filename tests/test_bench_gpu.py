"""benchmarks/gpu.py and gpu.sh: the script parses, its plan covers what the GPU check must show, and a
CPU dry run goes through every setup and variant (the GPU table itself needs a CUDA machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu
from benchmarks import train_step as bench

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_sh_parses_and_bounds_the_run_to_eight_minutes():
    script = ROOT / "benchmarks" / "gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "GPU_BENCH_TIMEOUT:-480" in text and "-m benchmarks.gpu" in text
    assert os.access(script, os.X_OK)


def test_default_plan_is_the_issue_matrix():
    args = gpu.parse([])
    assert args.variants == ["plain", "grad_ckpt", "compile"]
    assert args.setups == [
        bench.FLOOR,
        "OFT-Control (paper)",
        "OFT-Control (fast)",
        "ControlNet",
        "peft OFT (paper)",
        "peft OFT (fast)",
    ]
    assert args.budget_s < 480 and not args.dry_run
    plan = gpu.make_plan(args)
    assert (plan.latent * 8, plan.batches, plan.compile_backend) == (512, (4, 16), "inductor")
    assert str(plan.device) == "cuda"
    order = gpu.schedule(plan)
    assert len(order) == 36 and order[0] == ("plain", 4, bench.FLOOR) and order[-1][0] == "compile"
    with pytest.raises(SystemExit):
        gpu.parse(["--variants", "plain,fp8"])


def test_budget_skips_what_does_not_fit():
    plan = gpu.make_plan(gpu.parse(["--dry-run", "--budget-s", "0"]))
    results, skipped = gpu.run_all(plan, None, started=0.0, log=lambda _: None)
    assert results == [] and len(skipped) == len(gpu.schedule(plan))
    assert {why for *_, why in skipped} == {"time budget"}


def _dry_run(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--dry-run", "--threads", "1", "--json", str(out), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


@pytest.mark.timeout(300)
def test_cpu_dry_run_covers_every_setup_and_variant(tmp_path):
    """Every setup at two batch sizes, plain and with gradient checkpointing (about 25 s on CPU)."""
    readme = bench.README.read_text()
    raw, stdout = _dry_run(tmp_path, "--variants", "plain,grad_ckpt")
    assert raw["skipped"] == []
    seen = {(r["setup"], r["variant"], r["batch"]) for r in raw["results"]}
    assert seen == {(s, v, b) for s in gpu.SETUPS for v in ("plain", "grad_ckpt") for b in (1, 2)}
    assert all(r["step_s"] > 0 for r in raw["results"])
    assert "| plain | 1 | Floor: control encoder only |" in stdout and "| 1.00x |" in stdout
    assert bench.README.read_text() == readme  # only a CUDA run writes the table


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cpu_dry_run_compiled_variant(tmp_path):
    """The compiled path (dynamo with the eager backend, 10-20 s per setup on CPU) for every setup."""
    compiled, _ = _dry_run(tmp_path, "--variants", "compile", "--batches", "1")
    assert compiled["skipped"] == [] and {r["setup"] for r in compiled["results"]} == set(gpu.SETUPS)

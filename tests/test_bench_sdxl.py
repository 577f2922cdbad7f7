"""benchmarks/train_step.py on SDXL: the self-conditioned UNet gets the SDXL added conditions, every setup
(ControlNet included) trains one step on a small SDXL-architecture UNet, and the full-size counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from benchmarks import train_step as bench
from src.models import xl

pytestmark = pytest.mark.usefixtures("one_thread")
PIXELS = 64


def small_backbone() -> bench.Backbone:
    torch.manual_seed(0)
    unet = bench.self_conditioned(
        UNet2DConditionModel(**xl.small_unet_config()).requires_grad_(False), PIXELS
    )
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g)
    return bench.Backbone(
        name="small-sdxl",
        description="",
        unet=unet,
        scheduler=bench.DDPMScheduler(),
        encode=lambda: (latents, text),
        condition=torch.rand(1, 3, PIXELS, PIXELS, generator=g),
        noise=torch.randn(1, 4, 8, 8, generator=g),
        timesteps=torch.tensor([500]),
    )


def test_self_conditioned_unet_supplies_the_sdxl_added_conditions():
    backbone = small_backbone()
    latents, text = backbone.encode()
    pooled = torch.randn(1, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        implicit = backbone.unet(latents, backbone.timesteps, text).sample
        explicit = backbone.unet(
            latents, backbone.timesteps, text, added_cond_kwargs=xl.added_conditions(pooled, PIXELS, PIXELS)
        ).sample
        other = xl.added_conditions(pooled, PIXELS, 2 * PIXELS)  # other ids give another output
        moved = backbone.unet(latents, backbone.timesteps, text, added_cond_kwargs=other).sample
    assert torch.equal(implicit, explicit) and not torch.equal(implicit, moved)


@pytest.mark.parametrize("name", [*bench.SDXL_SETUPS, "ControlNet"])
def test_one_sdxl_step_trains_only_the_setup(name):
    backbone = small_backbone()
    frozen = {k: v.clone() for k, v in backbone.unet.state_dict().items()}
    setup = bench.SETUPS[name](backbone.unet)
    before = {k: p.detach().clone() for k, p in setup.trainable.items()}
    assert torch.isfinite(bench.train_step(backbone, setup))
    assert all(p.grad is None for p in backbone.unet.parameters())
    assert any(not torch.equal(before[k], p) for k, p in setup.trainable.items())
    assert all(torch.equal(frozen[k], v) for k, v in backbone.unet.state_dict().items())


def test_full_size_sdxl_setups_count_the_design_numbers():
    """On the meta device: OFT-Control (paper) trains the 162,565,760 rotation DOF of docs/design.md plus the
    encoder; SDXL's ControlNet copy is what does not fit a 24 GB CPU machine beside the UNet."""
    with torch.device("meta"):
        unet = bench.sdxl_unet()
        setups = {name: bench.SETUPS[name](unet) for name in [*bench.SDXL_SETUPS, "ControlNet"]}
    encoder = sum(p.numel() for p in setups[bench.FLOOR].trainable.values())
    assert setups[bench.REFERENCE].trainable_count == 162_565_760 + encoder
    assert setups["OFT-Control (fast)"].trainable_count == 13_471_360 + encoder
    controlnet = setups["ControlNet"].trainable_count
    assert 1.2e9 < controlnet < 1.3e9
    assert 4 * 4 * controlnet + 4 * sum(p.numel() for p in unet.parameters()) > 24 * 2**30  # fp32 + AdamW


# ------------------------------------------------------------------------------------------- gpu.py / gpu.sh
def test_gpu_sdxl_plan_is_the_issue_matrix():
    from benchmarks import gpu

    plan = gpu.make_plan(gpu.parse(["--backbone", "sdxl"]))
    assert (plan.latent * 8, plan.batches, plan.name, str(plan.device)) == (1024, (1, 4), "SDXL", "cuda")
    assert plan.setups == tuple(gpu.SDXL_SETUPS) and plan.variants == ("plain", "grad_ckpt")
    assert gpu.make_plan(gpu.parse([])).name == "SD1.5"  # the SD1.5 rows stay as they were
    script = (Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh").read_text()
    assert "--backbone sdxl" in script


@pytest.mark.timeout(300)
def test_gpu_sdxl_dry_run_covers_every_setup(tmp_path):
    """The SDXL rows' path on CPU (narrow SDXL-architecture UNet): every setup, both variants, two batches."""
    from benchmarks import gpu

    out = tmp_path / "gpu.json"
    command = [sys.executable, "-m", "benchmarks.gpu", "--backbone", "sdxl", "--dry-run", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [*command, "--json", str(out)], cwd=root, env=env, capture_output=True, text=True, timeout=280
    )
    assert done.returncode == 0, done.stderr[-3000:]
    raw = json.loads(out.read_text())
    assert raw["skipped"] == []
    seen = {(r["setup"], r["variant"], r["batch"]) for r in raw["results"]}
    assert seen == {(s, v, b) for s in gpu.SDXL_SETUPS for v in ("plain", "grad_ckpt") for b in (1, 2)}
    assert "| plain | 1 | Floor: control encoder only |" in done.stdout

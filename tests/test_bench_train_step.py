"""benchmarks/train_step.py and `python -m benchmarks`: what each setup trains, that the peers compute
what they claim, that one step leaves the frozen backbone alone, the README rewriting, the quick CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import __main__ as bench_all
from benchmarks import train_step as bench
from src.oft import oft_layers, project_coft_
from src.oft.peft_compat import skew_sign

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread, as the benchmark is recorded

ROOT = Path(__file__).resolve().parents[1]
SD15_PAPER_DOF = 13_144_928  # the official OFT README's r=4 row, checked in tests/test_oft_inject.py


def _targets(unet: nn.Module) -> list[nn.Linear]:
    """The plain Linear layers the paper preset adapts (on an un-adapted UNet)."""
    import re

    patterns = bench.oft_preset("paper").target_modules
    return [
        m
        for n, m in unet.named_modules()
        if isinstance(m, nn.Linear) and any(re.fullmatch(p, n) for p in patterns)
    ]


def _encoder_params(setup: bench.Setup) -> int:
    return sum(p.numel() for p in setup.modules["encoder"].parameters())


@pytest.fixture(scope="module")
def sd15_setups() -> tuple[nn.Module, dict[str, bench.Setup]]:
    """Every setup on a meta-device SD1.5 UNet (shapes only, no memory, no compute)."""
    with torch.device("meta"):
        unet = bench.sd15_unet()
        return unet, {name: build(unet) for name, build in bench.SETUPS.items()}


def test_sd15_trainable_counts(sd15_setups):
    unet, setups = sd15_setups
    controlnet = setups["ControlNet"]
    assert controlnet.trainable_count == sum(p.numel() for p in controlnet.modules["controlnet"].parameters())
    assert 360e6 < controlnet.trainable_count < 362e6  # "361M", and nothing of the UNet is trained
    paper = setups[bench.REFERENCE]
    encoder = _encoder_params(paper)
    assert 1.0e6 < encoder < 1.2e6
    assert paper.trainable_count == SD15_PAPER_DOF + encoder
    assert 24 < controlnet.trainable_count / paper.trainable_count < 27  # "about 25x fewer"
    layers = _targets(unet)
    assert len(layers) == 144
    fast_dof = sum(m.in_features // 32 * (32 * 31 // 2) for m in layers)
    assert setups["OFT-Control (fast)"].trainable_count == fast_dof + encoder
    lora = sum(bench.LORA_RANK * (m.in_features + m.out_features) for m in layers)
    assert setups[f"peft LoRA r={bench.LORA_RANK}"].trainable_count == lora + encoder
    for preset in ("paper", "fast"):  # the same rotations: the same degrees of freedom, diagnostic rows too
        ours = setups[f"OFT-Control ({preset})"].trainable_count
        assert setups[f"peft OFT ({preset})"].trainable_count == ours
        assert setups[f"{bench.DIAGNOSTIC} ({preset})"].trainable_count == ours


def test_setups_share_the_frozen_unet(sd15_setups):
    """Adapters wrap layers of a copy that holds the very same frozen tensors; ControlNet trains its own copy."""
    unet, setups = sd15_setups
    frozen = {id(p) for p in unet.parameters()}
    assert not any(p.requires_grad for p in unet.parameters())
    for name, setup in setups.items():
        assert not frozen & {id(p) for p in setup.trainable.values()}, name
        if name == "ControlNet":
            assert not frozen & {id(p) for p in setup.modules["controlnet"].parameters()}
        else:
            adapted = setup.modules["unet"]
            assert {id(p) for p in adapted.parameters() if not p.requires_grad} == frozen, name


@pytest.fixture(scope="module")
def tiny() -> bench.Backbone:
    return bench.tiny_backbone()


@pytest.mark.parametrize("preset", ["paper", "fast"])
def test_peft_oft_applies_the_same_rotations(tiny, preset):
    """With the same skew parameters (projected by COFT) and encoder, ours and peft's UNets agree."""
    ours, theirs = bench.oft_control(tiny.unet, preset), bench.peft_oft(tiny.unet, preset)
    torch.manual_seed(0)
    with torch.no_grad():
        ours.modules["encoder"].zero_out.weight.normal_(std=0.01)
        theirs.modules["encoder"].load_state_dict(ours.modules["encoder"].state_dict())
        for _, layer in oft_layers(ours.modules["unet"]):
            layer.oft_skew.normal_(std=0.05)  # some blocks beyond the COFT radius: both must clip them
        project_coft_(ours.modules["unet"])
        # peft's Neumann form rotates by the transpose of its exact form, i.e. by R(-Q)
        sign = skew_sign(bench.oft_preset(preset))
        for name, layer in oft_layers(ours.modules["unet"]):
            theirs.modules["unet"].get_submodule(name).oft_R["default"].weight.copy_(sign * layer.oft_skew)
        latents, text = tiny.encode()
        noisy = tiny.scheduler.add_noise(latents, tiny.noise, tiny.timesteps)
        inputs = (noisy, tiny.timesteps, text, tiny.condition)
        a, b, base = ours.predict(*inputs), theirs.predict(*inputs), tiny.unet(*inputs[:3]).sample
    assert (a - base).abs().max() > 1e-2  # the rotations and the control do something
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(bench.SETUPS))
def test_one_step_trains_only_the_setup(tiny, name):
    frozen = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    setup = bench.SETUPS[name](tiny.unet)
    before = {k: p.detach().clone() for k, p in setup.trainable.items()}
    loss = bench.train_step(tiny, setup)
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in setup.trainable.values())
    assert all(p.grad is None for p in tiny.unet.parameters())
    assert any(not torch.equal(before[k], p) for k, p in setup.trainable.items())
    assert all(torch.equal(frozen[k], v) for k, v in tiny.unet.state_dict().items())


def test_median_ratio_is_per_round():
    times = {"a": [1.0, 2.0, 4.0, 8.0, 1.0], "b": [2.0, 4.0, 8.0, 16.0, 50.0]}
    assert bench.median_ratio(times, "b", "a") == 2.0  # an outlier round does not move it
    assert bench.median_ratio(times, "a", "a") == 1.0


def test_write_section_round_trips_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    others = "<!-- oft_layer:start -->\nlayer table\n<!-- oft_layer:end -->\n\n<!-- memory:start -->\nm\n<!-- memory:end -->\n"
    readme.write_text(f"# Benchmarks\n\nprose\n\n{bench.START}\nold\n{bench.END}\n\nafter\n\n{others}")
    bench.write_section("| a | b |\n|---|---|", readme)
    first = readme.read_text()
    assert f"{bench.START}\n| a | b |\n|---|---|\n{bench.END}" in first
    assert first.startswith("# Benchmarks\n\nprose\n\n") and first.endswith(f"\n\nafter\n\n{others}")
    bench.write_section("something else", readme)
    bench.write_section("| a | b |\n|---|---|", readme)
    assert readme.read_text() == first  # rewriting is a pure function of the body
    bare = tmp_path / "bare.md"
    bare.write_text("# Benchmarks\n")
    bench.write_section("body", bare, "<!-- x:start -->", "<!-- x:end -->")
    assert bare.read_text() == "# Benchmarks\n\n<!-- x:start -->\nbody\n<!-- x:end -->\n"


def test_the_header_index_is_regenerated_from_each_sections_stamp(tmp_path):
    from benchmarks import readme as pages

    page = tmp_path / "README.md"
    page.write_text(f"# Benchmarks\n\n{pages.HEADER_START}\nstale text\n{pages.HEADER_END}\n")
    stamp = "Measured 2026-01-02 with `python -m benchmarks.x --threads 1` on 2 CPU cores (AMD EPYC 7B13), no GPU."
    pages.write_section(f"table\n\n{stamp}", page, "<!-- x:start -->", "<!-- x:end -->")
    pages.write_section("nothing measured yet", page, "<!-- y:start -->", "<!-- y:end -->")
    header = page.read_text().split(pages.HEADER_START)[1].split(pages.HEADER_END)[0]
    assert "stale text" not in header
    assert "| x | 2026-01-02 | `python -m benchmarks.x --threads 1` | 2 CPU cores, AMD EPYC 7B13 |" in header
    assert "| y | not yet |" in header
    assert pages.machine().startswith(f"{os.cpu_count()} CPU cores (") and "(R)" not in pages.machine()


def test_benchmarks_entry_passes_flags_and_skips_missing_scripts(monkeypatch, capsys):
    names = bench_all.scripts()
    assert names[:3] == ["oft_layer", "train_step", "memory"] and len(names) == len(set(names))
    assert "__main__" not in names and "__init__" not in names and "readme" not in names  # a helper
    args = bench_all.argparse.Namespace(quick=True, no_write=True, threads=1)
    assert bench_all.script_command("train_step", args)[1:] == [
        "-m",
        "benchmarks.train_step",
        "--quick",
        "--no-write",
        "--threads",
        "1",
    ]
    monkeypatch.setattr(bench_all, "available", lambda name: False)
    assert bench_all.main(["--only", "memory", "--no-write"]) == 0
    assert "benchmarks.memory does not exist yet: skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_all.main(["--only", "nonexistent"])


@pytest.mark.timeout(300)
def test_quick_run_end_to_end(tmp_path):
    """`--quick` on the tiny backbone: every setup measured, consistent numbers, README untouched."""
    readme = bench.README.read_text()
    out = tmp_path / "quick.json"
    start = time.perf_counter()
    command = [sys.executable, "-m", "benchmarks.train_step", "--quick", "--threads", "1", "--json", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=280)
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = json.loads(out.read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == list(bench.SETUPS)
    assert rows[bench.REFERENCE]["ratio"] == 1.0
    for r in rows.values():
        assert len(result["times"][r["name"]]) == 2 and all(t > 0 for t in result["times"][r["name"]])
        assert r["checkpoint_tensors"] == r["trainable"]  # the child trained the same tensors
        assert 4 * r["trainable"] < r["checkpoint_bytes"] < 4 * r["trainable"] + 2**20  # fp32 + header
        assert 0 < r["start_rss"] <= r["frozen_rss"] <= r["peak_rss"]
        assert f"| {r['name']} | {r['trainable']:,} |" in done.stdout
    assert bench.README.read_text() == readme
    assert elapsed < 150, f"--quick took {elapsed:.0f} s"  # about 45 s on the loaded 2-core machine


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_all_benchmarks_quick():
    """`python -m benchmarks --quick` runs every script that exists and writes nothing."""
    readme = bench.README.read_text()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--threads", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=880,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| OFT-Control (paper) |" in done.stdout
    assert bench.README.read_text() == readme

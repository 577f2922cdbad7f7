"""benchmarks/controllability.py: the quick run trains every method through the shared path, every
zero-initialised method starts as the base model, the counts match independent counts, and nothing is
written; the benchmark's loss is the module's."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import controllability as bench
from src.models.control import ControlEncoder
from src.models.pretrain import build_toy_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread, as the benchmark is recorded


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy backbone's architecture with random weights, saved as a diffusers folder."""
    folder = tmp_path_factory.mktemp("toy-random")
    build_toy_pipeline(0).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def quick(toy_folder: Path, offline_cache: Path) -> dict:
    """``python -m benchmarks.controllability --quick`` on the random toy folder, recording any call of the
    README and plot writers (the files themselves are shared with other work in progress)."""
    writes: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench.readme, "write_section", lambda *a, **k: writes.append("README"))
        patch.setattr(bench, "plot", lambda *a, **k: writes.append("plot"))
        result = bench.main(
            ["--quick", "--model-path", str(toy_folder), "--data-root", str(offline_cache / "data" / "demo")]
        )
    return {"result": result, "writes": writes}


def _rows(quick: dict) -> dict[str, dict]:
    return {row["key"]: row for row in quick["result"]["rows"]}


def test_quick_writes_nothing_and_covers_every_method(quick):
    assert quick["writes"] == []
    assert list(_rows(quick)) == [m.key for m in bench.METHODS]


def test_every_zero_initialised_method_starts_as_the_base_model(quick):
    """Same seed, same conditions, same sampler: at step 0 every zero-initialised method is the base model,
    so its images, hence its F1 and caption fidelity, equal the floor's exactly."""
    rows = _rows(quick)
    floor = rows["floor"]["evals"][0]
    keys = ("canny_f1", "canny_f1_chance", "caption_colour_acc", "caption_shape_acc", "caption_object_acc")
    for key, row in rows.items():
        if row["zero_init"]:
            assert {k: row["evals"][0][k] for k in keys} == {k: floor[k] for k in keys}, key
    assert not rows["t2i"]["zero_init"]


def test_trained_metrics_are_finite_and_rotations_keep_the_energy(quick):
    schedule = quick["result"]["schedule"]
    for key, row in _rows(quick).items():
        assert row["steps"] == schedule["steps"]
        assert sorted(row["evals"]) == list(schedule["eval_steps"])
        for step, values in row["evals"].items():
            for name in ("canny_f1", "canny_f1_chance", "caption_colour_acc", "caption_shape_acc"):
                assert 0.0 <= values[name] <= 1.0, (key, step, name)
        assert math.isfinite(row["step_s"]) and row["step_s"] > 0 and row["peak_mb"] > 0
    rows = _rows(quick)
    last = schedule["steps"]
    assert rows["oft_paper"]["evals"][last]["he_drift_max"] < 1e-6  # exact Cayley: float rounding only
    assert rows["floor"]["evals"][last]["he_drift_max"] == 0.0
    for key in ("lora16", "full", "controlnet"):  # additive updates move the energy
        assert rows[key]["evals"][last]["he_drift_max"] > 1e-6, key


def _targets(unet: nn.Module) -> list[nn.Linear]:
    patterns = bench.oft_preset("paper").target_modules
    return [
        m
        for n, m in unet.named_modules()
        if isinstance(m, nn.Linear) and any(re.fullmatch(p, n) for p in patterns)
    ]


def test_parameter_counts_match_independent_counts(quick, toy_folder):
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(toy_folder, subfolder="unet")
    layers = _targets(unet)
    assert len(layers) == 7 * 9  # seven transformer blocks in the toy UNet, nine layers each
    encoder = sum(p.numel() for p in ControlEncoder(unet.conv_in.out_channels, 8).parameters())
    expected = {
        "floor": encoder,
        "oft_paper": encoder + sum(4 * (m.in_features // 4) * (m.in_features // 4 - 1) // 2 for m in layers),
        "oft_fast": encoder + sum(m.in_features // 32 * 32 * 31 // 2 for m in layers),
        "lora4": encoder + sum(4 * (m.in_features + m.out_features) for m in layers),
        "lora16": encoder + sum(16 * (m.in_features + m.out_features) for m in layers),
        "full": encoder + sum(p.numel() for p in unet.parameters()),
        "controlnet": sum(p.numel() for p in ControlNetModel.from_unet(unet).parameters()),
    }
    expected["oft_nocoft"] = expected["oft_paper"]
    rows = _rows(quick)
    assert {key: rows[key]["trainable"] for key in expected} == expected
    for row in rows.values():  # float32 tensors plus a small safetensors header
        assert 4 * row["trainable"] < row["checkpoint_bytes"] < 4 * row["trainable"] + 64 * 1024


def test_benchmark_loss_is_the_modules_loss(toy_folder, offline_cache):
    """``diffusion_loss`` on the cached latents equals ``OFTControlModule.diffusion_loss`` for the same draws."""
    schedule = bench.QUICK
    spec = bench.BackboneSpec(name="toy", path=str(toy_folder), resolution=64, local_files_only=True)
    module, adapter = bench.build_run(bench.METHODS[0], spec, schedule)
    module.caption_dropout = 0.0
    with torch.no_grad():
        module.encoder.zero_out.weight.normal_(std=0.1)  # a control that changes the prediction
    datamodule = bench.demo_datamodule(offline_cache / "data" / "demo", schedule)
    batch = bench.to_model_inputs(next(iter(datamodule.train_dataloader())))
    batches = bench.Batches([], [], [], [])
    batches.append(batch, module.vae)
    torch.manual_seed(3)
    ours = bench.diffusion_loss(module, adapter, batches, 0)
    torch.manual_seed(3)
    theirs = module.diffusion_loss(batch, captions=batch["caption"])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)

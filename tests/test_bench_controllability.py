"""benchmarks/controllability.py: the quick run trains every method through the shared path, every
zero-initialised method starts as the base model, the counts match independent counts, and nothing is
written; the benchmark's loss is the module's training step (its ``sample_timesteps`` included); the lr is
the lowest held-out denoising loss on fixed draws; --jobs 2 gives the numbers of --jobs 1."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import controllability as bench
from src.models.control import ControlEncoder
from src.toy.backbone import build_toy_pipeline

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
            [
                "--quick",
                "--jobs",
                "2",
                "--model-path",
                str(toy_folder),
                "--data-root",
                str(offline_cache / "data" / "demo"),
            ]
        )
    return {"result": result, "writes": writes}


def _spec(folder: Path) -> bench.BackboneSpec:
    return bench.BackboneSpec(name="toy", path=str(folder), resolution=64, local_files_only=True)


#: what a run's seed fixes (timings and memory are the machine's)
DETERMINED = (
    "evals",
    "steps",
    "lr",
    "selection_loss",
    "selection_f1",
    "best_lr",
    "trainable",
    "checkpoint_bytes",
)


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


def test_benchmark_loss_is_the_modules_training_step(toy_folder, offline_cache):
    """``diffusion_loss`` on the cached latents equals the module's training step (caption dropout, then
    ``OFTControlModule.diffusion_loss`` with its cubic ``sample_timesteps``) for the same draws."""
    schedule = bench.QUICK
    assert schedule.timestep_sampling == bench.FULL.timestep_sampling == "cubic"
    module, adapter = bench.build_run(bench.METHODS[0], _spec(toy_folder), schedule)
    assert module.timestep_sampling == "cubic" and module.caption_dropout == 0.5
    with torch.no_grad():
        module.encoder.zero_out.weight.normal_(std=0.1)  # a control that changes the prediction
    datamodule = bench.demo_datamodule(offline_cache / "data" / "demo", schedule)
    batch = bench.to_model_inputs(next(iter(datamodule.train_dataloader())))
    batches = bench.Batches([], [], [], [])
    batches.append(batch, module.vae)
    for seed in range(3):
        torch.manual_seed(seed)
        ours = bench.diffusion_loss(module, adapter, batches, 0)
        torch.manual_seed(seed)
        theirs = module.diffusion_loss(batch, captions=module.drop_captions(batch["caption"]))
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_training_timesteps_are_the_modules_sample_timesteps(toy_folder, offline_cache, monkeypatch):
    """The loss takes its timesteps from ``OFTControlModule.sample_timesteps`` (one per sample) and uses
    them: pinned to the last timestep, the loss is the module's loss at that timestep."""
    schedule = bench.QUICK
    module, adapter = bench.build_run(bench.METHODS[3], _spec(toy_folder), schedule)
    datamodule = bench.demo_datamodule(offline_cache / "data" / "demo", schedule)
    batch = bench.to_model_inputs(next(iter(datamodule.train_dataloader())))
    batches = bench.Batches([], [], [], [])
    batches.append(batch, module.vae)
    calls = []
    last = module.noise_scheduler.config.num_train_timesteps - 1

    def pinned(self, count, device):
        calls.append(count)
        return torch.full((count,), last, dtype=torch.long, device=device)

    monkeypatch.setattr(bench.OFTControlModule, "sample_timesteps", pinned)
    torch.manual_seed(0)
    ours = bench.diffusion_loss(module, adapter, batches, 0)
    assert calls == [len(batch["caption"])]
    torch.manual_seed(0)
    captions = module.drop_captions(batch["caption"])
    theirs = module.diffusion_loss(batch, captions=captions)  # the patched method: the same timesteps
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_selection_draws_are_fixed_and_shared_by_every_method(toy_folder, offline_cache):
    """The selection inputs do not depend on the method or the global RNG, come from the module's cubic
    sampler, and the selection loss neither draws from nor moves the global RNG."""
    schedule = replace(bench.QUICK, selection_draws=3)
    spec = _spec(toy_folder)
    _, held_out = bench.shared_data(spec, offline_cache / "data" / "demo", schedule)
    drawn = []
    for seed, method in zip((1, 2), (bench.METHODS[0], bench.METHODS[6]), strict=True):  # OFT, ControlNet
        module, adapter = bench.build_run(method, spec, schedule)
        torch.manual_seed(seed)
        inputs = bench.selection_inputs(module, held_out.select, schedule)
        state = torch.get_rng_state()
        first = bench.selection_loss(module, adapter, inputs)
        assert bench.selection_loss(module, adapter, inputs) == first and math.isfinite(first)
        assert torch.equal(torch.get_rng_state(), state)
        drawn.append(inputs)
    a, b = drawn
    assert len(a.timesteps) == 3 and a.captions == b.captions == list(held_out.select["caption"])
    for name in ("latents", "noise", "timesteps"):
        for x, y in zip(getattr(a, name), getattr(b, name), strict=True):
            assert torch.equal(x, y), name
    assert not torch.equal(a.noise[0], a.noise[1])  # separate draws
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(schedule.seed + bench.SELECTION_SEED)
        module.encode_images(held_out.select["image"])
        torch.randn_like(a.latents[0])
        assert torch.equal(module.sample_timesteps(len(a.captions), "cpu"), a.timesteps[0])


def test_lr_choice_is_the_lowest_selection_loss_not_the_f1():
    sweep = {
        3e-4: {"selection_loss": 0.20, "selection_f1": 0.90, "diverged_at": None},
        1e-3: {"selection_loss": 0.10, "selection_f1": 0.10, "diverged_at": None},
        3e-3: {"selection_loss": 0.05, "selection_f1": 0.50, "diverged_at": 80},  # diverged: out
    }
    assert bench.choose_lr(sweep) == 1e-3
    sweep[3e-3] |= {"diverged_at": None, "selection_loss": float("nan")}
    assert bench.choose_lr(sweep) == 1e-3
    sweep[3e-4]["selection_loss"] = 0.10  # a tie: the first in the grid
    assert bench.choose_lr(sweep) == 3e-4
    with pytest.raises(FloatingPointError):
        bench.choose_lr({lr: r | {"diverged_at": 1} for lr, r in sweep.items()})


def test_full_schedule_and_its_plan():
    full = bench.FULL
    assert (full.batch_size, full.steps, full.sweep_steps, full.eval_steps) == (
        16,
        1000,
        150,
        (0, 100, 250, 500, 1000),
    )
    assert (full.eval_images, full.sampler_steps, full.guidance_scale, full.selection_draws) == (
        16,
        20,
        9.0,
        4,
    )
    assert bench.DEFAULT_JOBS == {"full": 2, "quick": 1}
    tasks = bench.plan(bench.METHODS, full)
    sweeps, continuations = tasks[:27], tasks[27:]
    assert not any(t.resume for t in sweeps) and all(t.resume for t in continuations) and len(tasks) == 36
    assert sorted(t.method.key for t in continuations) == sorted(m.key for m in bench.METHODS)
    assert sum(t.evaluate_start for t in sweeps) == 9  # step 0 once per method
    found = bench.estimate(bench.METHODS, full, 2, 2, 2.0)
    assert found["steps"] == 27 * 150 + 9 * 850
    assert found["evaluations"] == 9 * 1 + 27 * 2 + 9 * 3  # step 0; step 100 and selection F1; 250/500/1000
    low, high = found["wall_range_s"]
    assert low < found["wall_s"] < high
    assert bench.estimate(bench.METHODS, full, 1, 2, 2.0)["wall_s"] > found["wall_s"]
    with pytest.raises(ValueError):
        replace(full, sweep_steps=1001)


def test_shared_data_is_the_same_whatever_the_global_seed(toy_folder, offline_cache):
    """The training batches used to follow torch's random per-process initial seed (the pipeline mixes
    it into its shuffle seed): now the schedule's seed fixes them."""
    spec, root = _spec(toy_folder), offline_cache / "data" / "demo"
    torch.manual_seed(123)
    a, _ = bench.shared_data(spec, root, bench.QUICK)
    torch.manual_seed(456)
    b, _ = bench.shared_data(spec, root, bench.QUICK)
    assert a.captions == b.captions
    for x, y in zip(a.conditions + a.means, b.conditions + b.means, strict=True):
        assert torch.equal(x, y)


def test_jobs_change_timings_not_scores(quick, toy_folder, offline_cache):
    """The quick run at --jobs 2 against --jobs 1 on three of its methods: the same scores, exactly."""
    methods = tuple(m for m in bench.METHODS if m.key in ("oft_paper", "controlnet", "t2i"))
    alone = bench.measure(
        bench.QUICK, toy_folder, offline_cache / "data" / "demo", threads=1, methods=methods, jobs=1
    )
    rows = _rows(quick)
    assert quick["result"]["jobs"] == 2 and alone["jobs"] == 1
    for row in alone["rows"]:  # as JSON: exact float reprs, and NaN (T2I-Adapter's HE drift) equals NaN
        ours, theirs = ({k: r[k] for k in DETERMINED} for r in (row, rows[row["key"]]))
        assert json.dumps(ours, sort_keys=True) == json.dumps(theirs, sort_keys=True), row["key"]


def test_a_three_lr_sweep_continues_the_lowest_selection_loss(toy_folder, offline_cache):
    """Every lr of the grid is swept (two children at a time) and the one with the lowest selection loss
    is the one that goes on; the report shows every lr's loss and F1."""
    schedule = replace(bench.QUICK, lr_index=(0, 1, 2))
    floor = tuple(m for m in bench.METHODS if m.key == "floor")
    result = bench.measure(schedule, toy_folder, offline_cache / "data" / "demo", 1, methods=floor, jobs=2)
    (row,) = result["rows"]
    losses = {float(lr): loss for lr, loss in row["selection_loss"].items()}
    assert list(losses) == list(bench.LRS) and all(math.isfinite(v) for v in losses.values())
    assert len(set(losses.values())) == 3  # the lrs trained differently
    assert row["best_lr"] == min(losses, key=losses.__getitem__)
    assert row["steps"] == schedule.steps and sorted(row["evals"]) == list(schedule.eval_steps)
    assert row["lr"] == row["best_lr"]  # the continuation's AdamW came from the chosen lr's checkpoint
    text = bench.render(result, "python -m benchmarks.controllability")
    assert "`cubic`" in text and "lowest held-out denoising loss" in text and "(chosen)" in text
    for lr in bench.LRS:
        assert f"{lr:g}" in text

"""Generation from a trained run: determinism, control strength, inputs and the Hydra entry point."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import STEPS, compose_config, demo_inputs

from src.data.inputs import assign_prompts, collect_inputs
from src.generate import generate
from src.models.backbone import load_backbone
from src.models.inference import generate_images, load_controlled
from src.models.run import load_run
from src.models.sampling import SamplingOptions, build_pipeline, make_scheduler, sample_controlled
from src.oft import oft_parameters


@pytest.fixture(scope="module")
def controlled(trained_run):
    return load_controlled(trained_run)


def test_generation_is_deterministic_per_seed_and_independent_of_batching(controlled):
    inputs = demo_inputs(2)
    conditions = torch.stack([item.condition for item in inputs])
    prompts = [item.caption for item in inputs]
    options = SamplingOptions(num_inference_steps=STEPS, num_samples=2, batch_size=2)
    images = generate_images(controlled, conditions, prompts, options)
    assert images.shape == (2, 2, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(images, generate_images(controlled, conditions, prompts, options))
    assert (images[:, 0] - images[:, 1]).abs().max() > 1e-2  # seed + 1 is another sample
    alone = generate_images(
        controlled, conditions[1:], prompts[1:], SamplingOptions(num_inference_steps=STEPS)
    )
    torch.testing.assert_close(alone[:, 0], images[1:, 0], atol=1e-4, rtol=0)  # one generator per image
    unipc = generate_images(controlled, conditions[:1], prompts[:1], SamplingOptions("unipc", STEPS))
    assert (unipc[0, 0] - images[0, 0]).abs().max() > 1e-3


def test_strength_zero_is_the_base_model_and_strength_scales_the_control(trained_run):
    """Strength 0: the control encoder never runs (the adapted UNet alone); with identity rotations that is
    exactly the frozen backbone's own pipeline. Other strengths change the image, monotonically in size."""
    run = load_run(trained_run)
    with torch.no_grad():
        for param in oft_parameters(run.module.unet):
            param.zero_()
    module, base = run.module, load_backbone(run.module.backbone_spec)
    item = demo_inputs(1)[0]
    ddim = make_scheduler("ddim", base.noise_scheduler.config)

    def sample(pipe, strength: float) -> torch.Tensor:
        return sample_controlled(
            pipe,
            module.encoder,
            item.condition[None],
            [item.caption],
            num_inference_steps=STEPS,
            strength=strength,
            generator=torch.Generator().manual_seed(5),
        )

    ours = build_pipeline(module.unet, module.vae, module.text_encoder, module.tokenizer, ddim)
    stock = build_pipeline(base.unet, base.vae, base.text_encoder, base.tokenizer, ddim)
    reference = (
        stock(
            prompt=[item.caption],
            height=64,
            width=64,
            num_inference_steps=STEPS,
            guidance_scale=9.0,
            generator=torch.Generator().manual_seed(5),
            output_type="pt",
        )
        .images.float()
        .clamp(0, 1)
    )
    assert torch.equal(sample(ours, 0.0), reference)
    changes = [(sample(ours, s) - reference).abs().mean().item() for s in (0.5, 1.0, 2.0)]
    assert 1e-4 < changes[0] < changes[1] < changes[2], changes


def test_entry_point_writes_images_grid_and_record(trained_run, tmp_path):
    from PIL import Image

    folder = tmp_path / "conditions"
    folder.mkdir()
    for item in demo_inputs(2):
        array = (item.condition[0].numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(folder / f"{item.key}.png")
    cfg = compose_config(
        f"run={trained_run}",
        f"condition={folder}",
        "prompt=[a cat,a cup]",
        "sampling.num_samples=2",
        f"sampling.num_inference_steps={STEPS}",
        "sampling.seed=7",
        name="generate",
        output_dir=tmp_path / "out",
    )
    record = generate(cfg)
    out = tmp_path / "out"
    assert [(r["seed"], r["prompt"]) for r in record["images"]] == [
        (7, "a cat"),
        (8, "a cat"),
        (7, "a cup"),
        (8, "a cup"),
    ]
    assert all((out / r["file"]).is_file() for r in record["images"])
    assert json.loads((out / "generations.json").read_text())["num_inference_steps"] == STEPS
    with Image.open(out / "grid.png") as grid:  # 2 rows of condition | 2 samples, 64 px, 2 px padding
        assert grid.size == (3 * 64 + 4 * 2, 2 * 64 + 3 * 2)
        first = np.asarray(grid.convert("L"))[2:66, 2:66]
    source = sorted(folder.glob("*.png"))[0]
    assert np.abs(first.astype(int) - np.asarray(Image.open(source)).astype(int)).max() <= 1


def test_user_errors_are_raised_before_any_weights_load(trained_run, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the inputs were checked")

    monkeypatch.setattr("src.generate.load_controlled", refuse)
    image = tmp_path / "edges.png"
    from PIL import Image

    Image.fromarray(np.zeros((64, 64), np.uint8)).save(image)
    cases = [
        (
            (f"run={trained_run}", f"condition={image}", "prompt=[a,b]"),
            ValueError,
            "2 prompts for 1 conditions",
        ),
        ((f"run={trained_run}", f"condition={image}"), ValueError, "image conditions carry no caption"),
        (
            (f"run={trained_run}", f"condition={tmp_path / 'missing'}/*.tar", "prompt=x"),
            ValueError,
            "no shard found",
        ),
        (
            (f"run={trained_run}", f"condition={image}", "prompt=x", "sampling.scheduler=plms"),
            ValueError,
            "unknown scheduler 'plms'",
        ),
        (
            (f"run={tmp_path / 'nope'}", f"condition={image}", "prompt=x"),
            FileNotFoundError,
            "neither a run directory",
        ),
    ]
    for overrides, error, message in cases:
        with pytest.raises(error, match=message):
            generate(compose_config(*overrides, name="generate", output_dir=tmp_path / "out"))
    with pytest.raises(ValueError, match="no prompt for"):
        assign_prompts(collect_inputs(image, "canny", 64), None)


def test_run_files_and_checkpoint_identity_are_checked_before_weights_load(
    trained_run, tmp_path, monkeypatch
):
    from src.models.run import locate_run

    files = locate_run(trained_run / "checkpoints" / "last.ckpt")
    assert (files.run_dir, files.config) == (trained_run, trained_run / "config.yaml")
    with pytest.raises(
        FileNotFoundError, match=r"step_9.ckpt' does not exist; checkpoints of this run: \['last.ckpt'\]"
    ):
        locate_run(trained_run, trained_run / "checkpoints" / "step_9.ckpt")
    monkeypatch.setattr("src.models.run.check_backbone", lambda spec: pytest.fail("backbone checked"))
    foreign = torch.load(files.checkpoint, weights_only=True)
    foreign["oft_control"]["backbone"] = "sd15"
    torch.save(foreign, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match="trained on backbone 'sd15' but the run's config.yaml says 'toy'"):
        load_run(trained_run, tmp_path / "foreign.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="not an OFT-Control checkpoint"):
        load_run(trained_run, tmp_path / "plain.ckpt")

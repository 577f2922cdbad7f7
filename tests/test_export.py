"""Export: the merged diffusers folder generates what the run generates, the peft adapter gives our UNet
outputs on the base UNet, the control encoder round-trips, and user errors are caught early."""

from __future__ import annotations

import pytest
import torch
from helpers import STEPS, demo_inputs, make_trained_run
from torch import nn

from src.export import export
from src.models.backbone import load_backbone
from src.models.exported import load_control_encoder
from src.models.inference import generate_images, load_controlled
from src.models.run import load_run
from src.models.sampling import SamplingOptions
from src.oft import OFTConfig, inject_oft
from src.oft.peft_compat import peft_adapter


@pytest.fixture(scope="module")
def runs(trained_run, tmp_path_factory):
    """A run per OFT preset: `fast` (the default: Cayley-Neumann, block size 32) and `paper` (exact Cayley, 4 blocks)."""
    return {
        "fast": trained_run,
        "paper": make_trained_run(tmp_path_factory.mktemp("export") / "paper", "oft=paper"),
    }


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    return export(runs["fast"], tmp_path_factory.mktemp("exported"))


def test_merged_diffusers_folder_generates_what_the_run_generates(runs, exported):
    """Same seed, same sampler: the folder with W R merged into the UNet matches the run's on-the-fly rotations
    to float rounding (max |difference| <= 1e-4 on [0, 1] images), and is not the untrained model."""
    inputs = demo_inputs(2)
    conditions, prompts = torch.stack([i.condition for i in inputs]), [i.caption for i in inputs]
    options = SamplingOptions(num_inference_steps=STEPS)
    from_run = generate_images(load_controlled(runs["fast"]), conditions, prompts, options)
    folder = load_controlled(exported["diffusers"])
    assert (folder.condition, folder.resolution) == ("canny", 64)
    from_folder = generate_images(folder, conditions, prompts, options)
    assert (from_run - from_folder).abs().max() <= 1e-4
    folder.encoder.zero_out.weight.data.zero_()
    folder.encoder.zero_out.bias.data.zero_()
    assert (generate_images(folder, conditions, prompts, options) - from_run).abs().max() > 1e-3


@pytest.mark.parametrize("preset", ["fast", "paper"])
def test_peft_adapter_on_the_base_unet_gives_our_unet_outputs(runs, tmp_path, preset):
    from peft import PeftModel

    folder = export(runs[preset], tmp_path, formats=["peft"])["peft"]
    run = load_run(runs[preset])
    base = load_backbone(run.module.backbone_spec).unet
    g = torch.Generator().manual_seed(1)
    latents, text, t = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.randn(2, 16, base.config.cross_attention_dim, generator=g),
        torch.tensor([10, 700]),
    )
    with torch.no_grad():
        untouched = base(latents, t, text).sample
        ours = run.module.unet(latents, t, text).sample
        theirs = PeftModel.from_pretrained(base, folder)(latents, t, text).sample
    assert (ours - untouched).abs().max() > 1e-3  # the rotations matter...
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)  # ...and peft reproduces them


def test_control_encoder_round_trips_with_its_config(runs, exported):
    run = load_run(runs["fast"])
    encoder, config = load_control_encoder(exported["control_encoder"])
    assert (config["condition"], config["resolution"], config["downscale"]) == ("canny", 64, 8)
    condition = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(encoder(condition), run.module.encoder(condition))
        assert encoder(condition).abs().max() > 0


def test_export_refuses_to_overwrite_and_unknown_formats(runs, exported, tmp_path):
    out = exported["peft"].parent
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(runs["fast"], out, formats=["peft"])
    with pytest.raises(ValueError, match="unknown export format"):
        export(runs["fast"], tmp_path, formats=["onnx"])


def test_peft_export_refuses_what_peft_cannot_express():
    model = nn.ModuleDict({"conv": nn.Conv2d(4, 4, 3), "proj": nn.Linear(8, 8)})
    inject_oft(model, OFTConfig(block_size=4, target_modules=["conv", "proj"]))
    with pytest.raises(ValueError, match=r"nn.Linear only, but \['conv'\]"):
        peft_adapter(model, OFTConfig(block_size=4, target_modules=["conv"]))
    linear = nn.ModuleDict({"proj": nn.Linear(8, 8)})
    config = OFTConfig(block_size=4, cayley="neumann", neumann_terms=2, target_modules=["proj"])
    inject_oft(linear, config)
    with pytest.raises(ValueError, match="neumann_terms 2 has no peft equivalent"):
        peft_adapter(linear, config)

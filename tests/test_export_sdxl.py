"""The single-file export of SDXL backbones in Stability's `sgm` layout (that of `sd_xl_base_1.0.safetensors`):
`python -m src.export --formats single_file` on an OFT-Control run of a random-weight small SDXL-architecture
folder, read back by stock diffusers' `StableDiffusionXLPipeline.from_single_file` tensor for tensor and
sampling what the run samples; at SDXL base's full size (meta tensors) diffusers detects the file as
`xl_base` and its own converters map every name back; ComfyUI's model detection (when installed) takes it for
SDXL; layouts with no SDXL LDM form are refused with one line.

The small folder's second text encoder is 64 wide, the first 32: diffusers' loader tells SDXL's two encoders
apart by width (768 and 1280 in SDXL), so with equal widths it would read the first into both, and
`load_single_file` refuses that (tested below)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import STEPS, demo_inputs, make_trained_run
from test_export_comfyui import comfy  # noqa: F401  (its fixture: ComfyUI's engine, else a skip)

from src.errors import ConfigError
from src.export import main as export_main
from src.formats.ldm import UNET_PREFIX, VAE_PREFIX, check_backbone, check_unet, ldm_state_dict
from src.formats.single_file import CONFIG_DIR, SINGLE_FILE, load_single_file
from src.models import xl
from src.models.exported import load_control_encoder
from src.models.inference import ControlledModel, generate_images, load_controlled
from src.models.run import load_run
from src.models.sampling import SamplingOptions
from src.oft import merge_oft

pytestmark = pytest.mark.usefixtures("one_thread")
RES, WIDTH_2 = 64, 64  # cross-attention 32 + 64: a multiple of the OFT block size 32
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
XL_CLIP, XL_OPEN_CLIP = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An OFT-Control run directory on the small SDXL folder, with perturbed trained tensors."""
    folder = xl.write_small_folder(tmp_path_factory.mktemp("sdxl") / "small", text_2_width=WIDTH_2)
    out = tmp_path_factory.mktemp("sdxl-run") / "run"
    return make_trained_run(out, "model=sdxl", f"model.path={folder}", f"model.resolution={RES}")


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """`python -m src.export --run <run> --out_dir <dir> --formats single_file control_encoder`."""
    out = tmp_path_factory.mktemp("sdxl-export")
    args = ["--run", str(run), "--out_dir", str(out), "--formats", "single_file", "control_encoder"]
    return export_main(args)


def stock_single_file(folder):
    """Stock diffusers only, as a user of the export loads it."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_single_file(
        str(folder / SINGLE_FILE),
        config=str(folder / CONFIG_DIR),
        local_files_only=True,
        add_watermarker=False,
    )


def file_keys(folder) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(folder / SINGLE_FILE, "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is no mapping)


# ------------------------------------------------------------------------------------------- round trip
def test_sdxl_single_file_reloads_every_tensor_in_stock_diffusers(run, exported):
    """Every UNet (rotations merged), VAE and text-encoder tensor of the run comes back, bit for bit, from
    `StableDiffusionXLPipeline.from_single_file(..., config=..., local_files_only=True)`."""
    from diffusers import UNet2DConditionModel

    folder = exported["single_file"]
    keys = file_keys(folder)
    assert keys[f"{UNET_PREFIX}label_emb.0.0.weight"][1] == 6 * 8 + 32  # time ids + pooled text
    assert f"{UNET_PREFIX}label_emb.0.2.bias" in keys
    assert f"{UNET_PREFIX}input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight" in keys  # depth 2
    assert not any(k.startswith(f"{UNET_PREFIX}input_blocks.1.1.") for k in keys)  # no attention on level 0
    assert f"{VAE_PREFIX}decoder.up.0.block.0.conv1.weight" in keys
    assert f"{XL_CLIP}text_model.embeddings.position_embedding.weight" in keys
    assert keys[f"{XL_OPEN_CLIP}transformer.resblocks.2.attn.in_proj_weight"] == (3 * WIDTH_2, WIDTH_2)
    assert keys[f"{XL_OPEN_CLIP}text_projection"] == (WIDTH_2, 32)  # OpenCLIP's [width, projection]
    assert not any(k.startswith("cond_stage_model.") for k in keys)

    module = load_run(run).module
    base = UNet2DConditionModel.from_pretrained(module.backbone_spec.path, subfolder="unet").state_dict()
    merge_oft(module.unet)
    pipe = stock_single_file(folder)
    assert type(load_single_file(folder)).__name__ == "StableDiffusionXLPipeline"
    for part in PARTS:
        ours, theirs = getattr(module, part).state_dict(), getattr(pipe, part).state_dict()
        assert set(ours) == set(theirs), part
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), part
    stacked = 4 * pipe.text_encoder_2.config.num_hidden_layers  # q, k, v weights and biases -> in_proj
    assert len(keys) == sum(len(getattr(pipe, p).state_dict()) for p in PARTS) - stacked  # nothing unread
    merged = module.unet.state_dict()
    assert any(not torch.equal(merged[k], base[k]) for k in base)  # the rotations are in the file


def test_sdxl_single_file_generates_what_the_run_generates(run, exported):
    """`load_single_file` (stock `from_single_file`) + the exported control encoder, sampled as `src.generate`
    samples: the run's images (<= 1e-4, merged against on-the-fly rotations)."""
    inputs = demo_inputs(2)
    conditions, prompts = torch.stack([i.condition for i in inputs]), [i.caption for i in inputs]
    options = SamplingOptions(num_inference_steps=STEPS)
    from_run = generate_images(load_controlled(run), conditions, prompts, options)
    encoder, config = load_control_encoder(exported["control_encoder"])
    pipe = load_single_file(exported["single_file"])
    pipe.set_progress_bar_config(disable=True)
    model = ControlledModel(pipe, encoder, config["condition"], config["resolution"], pipe.scheduler.config)
    from_file = generate_images(model, conditions, prompts, options)
    print(f"sdxl: single file vs run {(from_file - from_run).abs().max():.2e}")
    assert from_file.shape == (2, 1, 3, RES, RES)
    assert (from_file - from_run).abs().max() <= 1e-4


# ------------------------------------------------------------------------------------------- full size
def full_size_meta():
    """SDXL base 1.0's UNet, VAE and both text encoders on the meta device (names and shapes, no memory)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = xl.full_size_configs()
    with torch.device("meta"):
        return (
            xl.meta_unet(configs["unet"]),
            AutoencoderKL.from_config(configs["vae"]),
            CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
            CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])),
        )


def test_full_size_sdxl_layout_round_trips_through_diffusers_converters():
    """At SDXL base's sizes: diffusers' own single-file code detects the file as `xl_base` (and both of its
    SDXL text encoders), and its converters map our names back to every diffusers parameter with its shape."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
        infer_diffusers_model_type,
        is_clip_sdxl_model,
        is_open_clip_sdxl_model,
    )

    unet, vae, text, text_2 = full_size_meta()
    ldm = ldm_state_dict(unet, vae, text, text_2)
    assert infer_diffusers_model_type(ldm) == "xl_base"
    assert is_clip_sdxl_model(ldm) and is_open_clip_sdxl_model(ldm)
    assert tuple(ldm[f"{UNET_PREFIX}label_emb.0.0.weight"].shape) == (1280, 2816)
    assert tuple(ldm[f"{UNET_PREFIX}middle_block.1.transformer_blocks.9.attn1.to_q.weight"].shape) == (
        1280,
        1280,
    )
    assert tuple(ldm[f"{XL_OPEN_CLIP}transformer.resblocks.31.attn.in_proj_weight"].shape) == (3840, 1280)
    back = {
        "unet": convert_ldm_unet_checkpoint(ldm, unet.config),
        "vae": convert_ldm_vae_checkpoint(ldm, vae.config),
        "text_encoder": {
            k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ldm).items()
        },
        "text_encoder_2": convert_open_clip_checkpoint(text_2, ldm, prefix=XL_OPEN_CLIP),
    }
    for name, module in zip(PARTS, (unet, vae, text, text_2), strict=True):
        want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in back[name].items()} == want, name


def test_comfyui_detects_the_full_size_file_as_sdxl(comfy):  # noqa: F811
    """ComfyUI's model detection (its UNet config from the file's shapes, then its list of supported models),
    when ComfyUI's engine is installed, names SDXL and the UNet config of SDXL base."""
    unet, vae, text, text_2 = full_size_meta()
    ldm = ldm_state_dict(unet, vae, text, text_2)
    config = comfy.model_detection.model_config_from_unet(ldm, UNET_PREFIX)
    assert type(config).__name__ == "SDXL"
    detected = config.unet_config
    assert detected["adm_in_channels"] == 2816 and detected["context_dim"] == 2048
    assert detected["transformer_depth"] == [0, 0, 2, 2, 10, 10]


# ------------------------------------------------------------------------------------------- refusals
def test_layouts_without_an_sdxl_ldm_form_are_refused_with_one_line(exported, tmp_path):
    config = xl.full_size_configs()["unet"]
    check_unet(config)  # SDXL base itself is expressible
    cases = {
        "transformer_layers_per_block": (
            [[1, 1], [2, 3], [10, 10]],
            r"transformer_layers_per_block \[\[1, 1\], \[2, 3\], \[10, 10\]\] varies within a level",
        ),
        "reverse_transformer_layers_per_block": ([[10, 10, 10], [2, 2, 2], [1, 1, 1]], "reverse_transformer"),
        "addition_embed_type": ("text_image", r"addition_embed_type 'text_image' \(SDXL's is 'text_time'"),
        "class_embed_type": ("projection", "class_embed_type 'projection'"),
    }
    for key, (value, match) in cases.items():
        with pytest.raises(ConfigError, match=rf"UNet has no original .*{match}.*diffusers/ folder") as error:
            check_unet({**config, key: value})
        assert "\n" not in str(error.value), key

    unet, vae, text, text_2 = full_size_meta()
    with pytest.raises(
        ConfigError, match="addition_embed_type 'text_time' without SDXL's second text encoder"
    ):
        check_backbone(unet.config, vae.config, text)
    with pytest.raises(ConfigError, match="CLIPTextModel, CLIPTextModel .*CLIPTextModelWithProjection"):
        check_backbone(unet.config, vae.config, text, text)

    copy = shutil.copytree(exported["single_file"] / CONFIG_DIR, tmp_path / "equal" / CONFIG_DIR)
    path = copy / "text_encoder_2" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "hidden_size": 32}))
    with pytest.raises(
        ConfigError, match="both SDXL text encoders .* are 32 wide: .*use the diffusers/ export"
    ):
        load_single_file(tmp_path / "equal")

"""SDXL backbones (`model=sdxl`): what differs from SD1/SD2 in loading, conditioning and sampling.

- Two text encoders and tokenizers: CLIP ViT-L (`text_encoder`) and OpenCLIP bigG with a projection
  (`text_encoder_2`). The UNet's cross-attention reads the penultimate hidden states of both, concatenated
  (768 + 1280 = 2048 channels); its added embedding reads the second encoder's pooled, projected output.
- Six size/crop time ids per image, `(original_h, original_w, crop_top, crop_left, target_h, target_w)`:
  training images are resized and centre-cropped to the training resolution, so they are
  `(H, W, 0, 0, H, W)`, exactly what `StableDiffusionXLPipeline` passes when sampling at `H x W`.
- The VAE overflows in fp16 (its config says `force_upcast`): latents are encoded in fp32 with autocast
  off, as diffusers' pipelines decode them; a fixed VAE (`model.vae_path`, e.g. an fp16-fix VAE whose
  config drops `force_upcast`) skips the upcast.

Conditioning is computed as `StableDiffusionXLPipeline.encode_prompt` and `_get_add_time_ids` compute it
(tests check equality with the stock pipeline). `src/models/sdxl/` holds the public SDXL-base-1.0 configs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from src.errors import ConfigError

CONFIGS = Path(__file__).parent / "sdxl"
FAMILIES = ("sd", "sdxl")
#: model_index.json entries an SDXL text-to-image folder has beyond SD's
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")


# ------------------------------------------------------------------------------------------- the folder
def folder_family(index: Mapping[str, Any]) -> str:
    """`sdxl` for a pipeline index with both text encoders and tokenizers, else `sd`."""
    parts = {"text_encoder", "tokenizer", *SDXL_PARTS}
    return "sdxl" if parts <= set(index) else "sd"


def check_family(family: str, name: str, path: str, index: Mapping[str, Any]) -> None:
    """Refuse (one line) a `model.family` that is unknown or does not match the folder's pipeline index."""
    if family not in FAMILIES:
        raise ConfigError(
            f"model.family {family!r} is not one of {', '.join(FAMILIES)}: use model=sdxl or sd15"
        )
    found, kind = folder_family(index), index.get("_class_name", "a pipeline")
    if found == family:
        return
    if family == "sdxl":
        raise ConfigError(
            f"model={name} needs an SDXL folder (text_encoder_2 and tokenizer_2 beside text_encoder) but "
            f"model.path='{path}' holds {kind} without them: point model.path at an SDXL diffusers folder "
            "(e.g. stable-diffusion-xl-base-1.0), or use model=sd15 model.path=... for this one"
        )
    raise ConfigError(
        f"model.path='{path}' is an SDXL folder ({kind}, two text encoders) but model={name} loads SD1/SD2 "
        f"backbones: use model=sdxl model.path={path}"
    )


def read_index(source: str, revision: str | None, local_only: bool) -> dict[str, Any]:
    """The pipeline's `model_index.json` from a local folder or the hub cache (no weights)."""
    local = Path(source) / "model_index.json"
    if local.is_file():
        return json.loads(local.read_text())
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(source, "model_index.json", revision=revision, local_files_only=local_only)
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------------------------------- loading
def load_text_2(source: str, common: dict, weights: dict) -> tuple[nn.Module, Any]:
    """The second text encoder (`CLIPTextModelWithProjection`) and its tokenizer, frozen."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    encoder = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", **weights)
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **common)
    return encoder.requires_grad_(False).eval(), tokenizer


def load_vae(spec, source: str, common: dict, weights: dict) -> nn.Module:
    """The backbone's VAE, or the one at `spec.vae_path` (a folder or hub id of an `AutoencoderKL`)."""
    from diffusers import AutoencoderKL

    vae_path = getattr(spec, "vae_path", None)
    if vae_path:
        return AutoencoderKL.from_pretrained(vae_path, **weights)
    return AutoencoderKL.from_pretrained(source, subfolder="vae", **weights)


# ------------------------------------------------------------------------------------------- conditioning
def _tokens(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


@torch.no_grad()
def encode_prompts(
    tokenizers: Sequence[Any], encoders: Sequence[nn.Module], captions: Sequence[str], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(hidden [B, 77, sum of widths], pooled [B, projection])`: the penultimate hidden states of every
    encoder, concatenated, and the last encoder's pooled projected output (SDXL's `encode_prompt`)."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
        out = encoder(_tokens(tokenizer, captions).to(device), output_hidden_states=True)
        pooled = out[0]
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled


def time_ids(height: int, width: int, count: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`[count, 6]` size/crop ids of uncropped `height x width` images generated at that size."""
    row = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)
    return row.repeat(count, 1)


def added_conditions(pooled: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
    """The UNet's `added_cond_kwargs` for a batch of `height x width` images."""
    ids = time_ids(height, width, pooled.shape[0], pooled.device, pooled.dtype)
    return {"text_embeds": pooled, "time_ids": ids}


def needs_fp32_vae(vae: nn.Module) -> bool:
    """True for a VAE that overflows in half precision (its config's `force_upcast`, SDXL's VAE)."""
    return bool(getattr(vae.config, "force_upcast", False))


# ------------------------------------------------------------------------------------------- pipelines
def build_xl_pipeline(unet, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, scheduler):
    """A stock `StableDiffusionXLPipeline` over the given (possibly adapted) components, no watermark."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------- architecture
def full_size_configs() -> dict[str, dict[str, Any]]:
    """The public SDXL-base-1.0 configs of `src/models/sdxl/` (`unet`, `vae`, `text_encoder`, ...)."""
    return {p.name[: -len("_config.json")]: json.loads(p.read_text()) for p in CONFIGS.glob("*_config.json")}


def meta_unet(config: Mapping[str, Any] | None = None) -> nn.Module:
    """The SDXL UNet (default: full size) on the meta device: real names and shapes, no memory."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(dict(config or full_size_configs()["unet"]))


SMALL_TEXT = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=3,
    max_position_embeddings=77,
    layer_norm_eps=1e-5,
)


def small_unet_config(
    text_width: int = 32, pooled: int = 32, text_2_width: int | None = None
) -> dict[str, Any]:
    """An SDXL-architecture UNet (text_time embedding, two-encoder cross-attention, a first level without
    attention, per-level transformer depth and heads, linear projections, layers_per_block 2), small; the
    second encoder's width is `text_width` unless given."""
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        cross_attention_dim=text_width + (text_2_width or text_width),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + pooled,
        norm_num_groups=8,
    )


def build_small_pipeline(seed: int = 0, text_2_width: int | None = None):
    """A random-weight, small SDXL-architecture `StableDiffusionXLPipeline` (real diffusers and transformers
    classes, small widths; the VAE keeps the factor 8 and SDXL's scaling and `force_upcast`), seeded. Both text
    encoders are 32 wide unless `text_2_width` widens the second (as SDXL's 768 and 1280 differ, which
    diffusers' single-file loader needs to tell them apart)."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from src.models.tiny import TINY_SCHEDULER, TINY_VAE, build_tokenizer

    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer()
    tokenizer_2.pad_token = "!"  # SDXL's second tokenizer pads with "!", the first with <|endoftext|>
    torch.manual_seed(seed)

    def text_config(tok, **extra) -> CLIPTextConfig:
        ids = dict(
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        )
        return CLIPTextConfig(vocab_size=len(tok), **ids, **{**SMALL_TEXT, **extra})

    scheduler = {k: v for k, v in TINY_SCHEDULER.items() if k != "clip_sample"}
    width_2 = {"hidden_size": text_2_width} if text_2_width else {}
    return build_xl_pipeline(
        unet=UNet2DConditionModel(**small_unet_config(text_2_width=text_2_width)),
        vae=AutoencoderKL(**TINY_VAE, scaling_factor=0.13025, force_upcast=True),
        text_encoder=CLIPTextModel(text_config(tokenizer, projection_dim=32)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(
            text_config(tokenizer_2, projection_dim=32, hidden_act="gelu", **width_2)
        ),
        tokenizer_2=tokenizer_2,
        scheduler=diffusers.EulerDiscreteScheduler(**scheduler, timestep_spacing="leading"),
    )


def write_small_folder(folder: str | Path, seed: int = 0, text_2_width: int | None = None) -> Path:
    """Save `build_small_pipeline(seed, text_2_width)` as a diffusers folder (`model=sdxl model.path=<folder>`);
    its scheduler config gains the DDIM keys SDXL's ships (`clip_sample` false...), which the samplers built from
    it read."""
    folder = Path(folder)
    build_small_pipeline(seed, text_2_width).save_pretrained(folder, safe_serialization=True)
    path = folder / "scheduler" / "scheduler_config.json"
    shipped = json.loads((CONFIGS / "scheduler_config.json").read_text())
    ddim_keys = ("clip_sample", "set_alpha_to_one", "skip_prk_steps", "sample_max_value")
    path.write_text(
        json.dumps({**json.loads(path.read_text()), **{k: shipped[k] for k in ddim_keys}}, indent=2)
    )
    return folder

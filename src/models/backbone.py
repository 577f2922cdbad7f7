"""Frozen Stable Diffusion components, loaded through diffusers' `from_pretrained` for every backbone.

`BackboneSpec` is what the `model/` config group instantiates; `check_backbone` resolves it cheaply (and
fails with one clear line when weights are unreachable) before anything expensive starts, and
`load_backbone` loads the frozen components.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from src.errors import ConfigError, MissingInputError


class BackboneNotFoundError(MissingInputError):
    """The backbone's weights are neither a local diffusers folder nor reachable on the hub."""


@dataclass(frozen=True)
class BackboneSpec:
    """Where the frozen text-to-image model comes from.

    Args:
        name: short name recorded in checkpoints (`tiny`, `sd15`, `sd21`, ...).
        path: a local diffusers folder (with `model_index.json`) or a hub id. For `build_tiny`, the cache
            directory in which the tiny backbone is built on first use.
        resolution: training and sampling resolution in pixels.
        build_tiny: build the offline tiny backbone under `path` instead of loading existing weights.
        revision: hub revision (branch, tag or commit), if `path` is a hub id.
        variant: weight variant such as `fp16`, if the folder has one.
        local_files_only: never contact the hub, even when `path` is a hub id that is not cached.
        family: `sd` (SD1/SD2: one text encoder) or `sdxl` (two text encoders, pooled text embeddings and
            size/crop time ids; `src.models.xl`); checked against the folder before anything loads.
        vae_path: a VAE folder or hub id loaded instead of the backbone's `vae/` (e.g. SDXL's fp16-fix VAE).
    """

    name: str
    path: str
    resolution: int
    build_tiny: bool = False
    revision: str | None = None
    variant: str | None = None
    local_files_only: bool = False
    family: str = "sd"
    vae_path: str | None = None


@dataclass
class Backbone:
    """The frozen components a training step needs."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    noise_scheduler: object
    text_encoder_2: nn.Module | None = None  # SDXL's second text encoder and tokenizer
    tokenizer_2: object | None = None

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _not_found(spec: BackboneSpec, reason: str) -> BackboneNotFoundError:
    return BackboneNotFoundError(
        f"backbone '{spec.name}' weights at '{spec.path}' are not available ({reason}): point "
        f"model.path at a local diffusers folder that contains model_index.json "
        f"(e.g. model.path=/data/stable-diffusion-v1-5), or download '{spec.path}' once while online"
    )


def check_backbone(spec: BackboneSpec) -> str:
    """Resolve `spec` to a local folder or a cached/reachable hub id without loading any weights.

    Builds the tiny backbone if asked to. Raises `BackboneNotFoundError` with one line naming the fix, and
    `ConfigError` when the folder's pipeline is not of `spec.family` (an SD folder for `model=sdxl`).
    """
    if spec.build_tiny:
        from src.models.tiny import ensure_tiny_backbone

        return str(ensure_tiny_backbone(spec.path))
    source = _resolve(spec)
    from src.models.xl import check_family, read_index

    index = read_index(source, spec.revision, spec.local_files_only or _offline())
    check_family(getattr(spec, "family", "sd"), spec.name, spec.path, index)
    return source


def _resolve(spec: BackboneSpec) -> str:
    """`spec.path` as a local folder with `model_index.json`, or a cached/reachable hub id."""
    local = Path(spec.path).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise _not_found(spec, f"folder '{local}' has no model_index.json")
        return str(local)
    if local.is_absolute() or spec.path.startswith("."):
        raise _not_found(spec, "no such folder")
    return _check_hub(spec)


def _check_hub(spec: BackboneSpec) -> str:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(spec.path, "model_index.json", revision=spec.revision)
    if isinstance(cached, str):
        return spec.path
    if spec.local_files_only or _offline():
        raise _not_found(spec, "not in the local hub cache and the hub is off")
    try:
        hf_hub_download(spec.path, "model_index.json", revision=spec.revision)
    except Exception as err:  # any network, auth or not-found failure means the same to the user
        raise _not_found(spec, f"hub unreachable: {type(err).__name__}") from None
    return spec.path


def vae_scale_factor(spec: BackboneSpec) -> int:
    """Pixels per latent cell of the backbone's VAE (8 for SD), read from its config without weights."""
    from diffusers import AutoencoderKL

    source = check_backbone(spec)
    local = spec.local_files_only or _offline()
    config = AutoencoderKL.load_config(
        source, subfolder="vae", revision=spec.revision, local_files_only=local
    )
    return 2 ** (len(config["block_out_channels"]) - 1)


def check_resolution(spec: BackboneSpec) -> int:
    """Raise `ConfigError` unless `model.resolution` is a positive multiple of the VAE's downsampling factor
    (the latent grid and the control embedding would not align); checked from configs, before any weights
    load. Returns the factor."""
    factor = vae_scale_factor(spec)
    resolution = spec.resolution
    if (
        isinstance(resolution, bool)
        or not isinstance(resolution, int)
        or resolution < factor
        or resolution % factor
    ):
        low = max(factor, int(resolution) // factor * factor) if isinstance(resolution, int) else factor
        raise ConfigError(
            f"model.resolution={resolution!r} is not a multiple of the VAE's downsampling factor {factor} of "
            f"backbone '{spec.name}': use a multiple of {factor}, e.g. model.resolution={low}"
        )
    return factor


def unet_skeleton(spec: BackboneSpec) -> nn.Module:
    """The backbone's UNet built from its config on the meta device: real module names and shapes, no weights.

    Lets OFT targets and block sizes be checked in a fraction of a second before anything loads.
    """
    from diffusers import UNet2DConditionModel

    source = check_backbone(spec)
    local = spec.local_files_only or _offline()
    config = UNet2DConditionModel.load_config(
        source, subfolder="unet", revision=spec.revision, local_files_only=local
    )
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def load_backbone(spec: BackboneSpec, dtype: torch.dtype = torch.float32) -> Backbone:
    """Load the frozen UNet, VAE, text encoder(s), tokenizer(s) and training noise scheduler of `spec`."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from src.models.xl import load_text_2, load_vae

    source = check_backbone(spec)
    common = dict(revision=spec.revision, local_files_only=spec.local_files_only or _offline())
    weights = dict(common, variant=spec.variant, torch_dtype=dtype)
    backbone = Backbone(
        unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", **weights),
        vae=load_vae(spec, source, common, weights),
        text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **weights),
        tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common),
        noise_scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler", **common),
    )
    if getattr(spec, "family", "sd") == "sdxl":
        backbone.text_encoder_2, backbone.tokenizer_2 = load_text_2(source, common, weights)
    for module in (backbone.unet, backbone.vae, backbone.text_encoder):
        module.requires_grad_(False).eval()
    return backbone

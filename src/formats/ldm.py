"""Diffusers state dicts in the original Stable Diffusion (LDM / CompVis, and SDXL's `sgm`) key layout.

AUTOMATIC1111, Forge and ComfyUI load a checkpoint as one file whose keys are those of the original
`ldm` code: the UNet under `model.diffusion_model.` (`input_blocks.N`, `middle_block.N`,
`output_blocks.N`, `time_embed`, `out`), the VAE under `first_stage_model.` (`encoder.down.i.block.j`,
`decoder.up.i` numbered from the lowest resolution, 1x1-convolution attention) and the text encoder under
`cond_stage_model.transformer.text_model.` (SD1's CLIP) or `cond_stage_model.model.` (SD2's OpenCLIP); SDXL's
two under `conditioner.embedders.0.transformer.` (CLIP ViT-L) and `conditioner.embedders.1.model.` (OpenCLIP
bigG; see `src.formats.ldm_text`). The block numbering follows from the UNet config: with
`L = layers_per_block`, down block `i` sub-layer `j` is `input_blocks.{1 + i (L + 1) + j}` and its
downsampler `input_blocks.{(i + 1)(L + 1)}`; up block `i` sub-layer `j` is `output_blocks.{i (L + 1) + j}`,
its upsampler the last sub-module of `output_blocks.{i (L + 1) + L}`. A level's transformer depth only
numbers `transformer_blocks.N` inside its attention (same name in both layouts), so SDXL's per-level depths
(`transformer_layers_per_block`, levels without attention) need no rule of their own; SDXL's added embedding
(`addition_embed_type` `text_time`, pooled text + size/crop ids) is `label_emb.0.0` / `label_emb.0.2`.

Only the SD1/SD2/SDXL-class layouts are written: the block types those use, an integer `layers_per_block`,
one transformer depth per level (the same going down and up), no class embedding and no added embedding but
SDXL's `text_time` (which needs SDXL's second text encoder, and the second encoder needs it), CLIP text
encoders. Any other layout is refused with one line (`ConfigError`) naming what does not fit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from src.errors import ConfigError
from src.formats.ldm_text import check_text_encoder, check_text_encoders, text_state_dict

__all__ = [
    "check_backbone",
    "check_text_encoder",
    "check_text_encoders",
    "check_unet",
    "check_vae",
    "ldm_state_dict",
    "unet_key",
    "vae_key",
]

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."  # SD1's CLIP; SD2's OpenCLIP: src.formats.ldm_text
UNET_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
UNET_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
UNET_MID = ("UNetMidBlock2DCrossAttn",)
VAE_DOWN, VAE_UP = ("DownEncoderBlock2D",), ("UpDecoderBlock2D",)

UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
UNET_ADDED = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # SDXL
ADDED_TYPES = (None, "text_time")  # SD1/SD2: none; SDXL: pooled text + size/crop ids
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
VAE_FIXED = {"conv_norm_out": "norm_out"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _refuse(part: str, what: str) -> ConfigError:
    return ConfigError(
        f"the backbone's {part} has no original Stable Diffusion (LDM) layout: {what}; single_file writes "
        "SD1/SD2/SDXL-class backbones only, export the diffusers/ folder instead"
    )


# ------------------------------------------------------------------------------------------------ checks
def check_unet(config: Mapping[str, Any]) -> None:
    """Refuse a UNet config the LDM layout cannot hold (one line naming the value)."""
    for key, allowed in (("down_block_types", UNET_DOWN), ("up_block_types", UNET_UP)):
        odd = sorted(set(config[key]) - set(allowed))
        if odd:
            raise _refuse("UNet", f"{key} {odd} (LDM has {', '.join(allowed)})")
    if config.get("mid_block_type", UNET_MID[0]) not in UNET_MID:
        raise _refuse("UNet", f"mid_block_type {config['mid_block_type']!r}")
    if not isinstance(config["layers_per_block"], int):
        raise _refuse("UNet", f"layers_per_block {config['layers_per_block']} differs between blocks")
    for key in ("class_embed_type", "encoder_hid_dim_type", "time_cond_proj_dim"):
        if config.get(key) is not None:
            raise _refuse("UNet", f"{key} {config[key]!r} (SD1, SD2 and SDXL have none)")
    if config.get("addition_embed_type") not in ADDED_TYPES:
        what = f"addition_embed_type {config['addition_embed_type']!r}"
        raise _refuse("UNet", f"{what} (SDXL's is 'text_time', SD1 and SD2 have none)")
    _check_depth(config)


def _check_depth(config: Mapping[str, Any]) -> None:
    """One transformer depth per level, the same for the down and the up path (the LDM UNet's
    `transformer_depth`), and the single cross-attention block SD1, SD2 and SDXL use."""
    depth = config.get("transformer_layers_per_block", 1)
    if not isinstance(depth, int) and not all(isinstance(d, int) for d in depth):
        raise _refuse("UNet", f"transformer_layers_per_block {list(depth)} varies within a level")
    if config.get("reverse_transformer_layers_per_block") is not None:
        reverse = config["reverse_transformer_layers_per_block"]
        raise _refuse("UNet", f"reverse_transformer_layers_per_block {reverse} (one depth per level)")
    if config.get("dual_cross_attention"):
        raise _refuse("UNet", "dual_cross_attention true (one cross-attention per transformer)")


def check_backbone(unet_config, vae_config, text_encoder, text_encoder_2=None) -> None:
    """Refuse (one line) a UNet, VAE or text encoder(s) with no LDM layout, or a UNet whose added embedding
    does not match the text encoders: SDXL's `text_time` needs its second (pooled) text encoder and back."""
    check_unet(unet_config)
    check_vae(vae_config)
    check_text_encoders(text_encoder, text_encoder_2)
    added = unet_config.get("addition_embed_type")
    if added is not None and text_encoder_2 is None:
        raise _refuse("UNet", f"addition_embed_type {added!r} without SDXL's second text encoder")
    if added is None and text_encoder_2 is not None:
        raise _refuse("UNet", "a second text encoder without SDXL's addition_embed_type 'text_time'")


def check_vae(config: Mapping[str, Any]) -> None:
    """Refuse a VAE config the LDM layout cannot hold (one line naming the value)."""
    for key, allowed in (("down_block_types", VAE_DOWN), ("up_block_types", VAE_UP)):
        odd = sorted(set(config[key]) - set(allowed))
        if odd:
            raise _refuse("VAE", f"{key} {odd}")
    if not config.get("mid_block_add_attention", True):
        raise _refuse("VAE", "mid_block_add_attention false (LDM's VAE has a middle attention)")


# ------------------------------------------------------------------------------------------------ UNet
def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{UNET_RESNET.get(head, head)}.{tail}"


def unet_key(name: str, config: Mapping[str, Any]) -> str:
    """The LDM name (without prefix) of the diffusers UNet parameter `name`."""
    step = config["layers_per_block"] + 1
    head, _, tail = name.rpartition(".")
    if head in UNET_FIXED:
        return f"{UNET_FIXED[head]}.{tail}"
    if head in UNET_ADDED and config.get("addition_embed_type") == "text_time":
        return f"{UNET_ADDED[head]}.{tail}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + i * step + j
        return (
            f"input_blocks.{index}.0.{_resnet(rest)}"
            if kind == "resnets"
            else f"input_blocks.{index}.1.{rest}"
        )
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", name):
        return f"input_blocks.{(int(m[1]) + 1) * step}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name):
        kind, j, rest = m[1], int(m[2]), m[3]
        return f"middle_block.{2 * j}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = i * step + j
        return (
            f"output_blocks.{index}.0.{_resnet(rest)}"
            if kind == "resnets"
            else f"output_blocks.{index}.1.{rest}"
        )
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", name):
        i = int(m[1])
        slot = 2 if config["up_block_types"][i].startswith("CrossAttn") else 1
        return f"output_blocks.{i * step + step - 1}.{slot}.conv.{m[2]}"
    raise _refuse("UNet", f"parameter {name!r} has no LDM name")


# ------------------------------------------------------------------------------------------------ VAE
def vae_key(name: str, n_blocks: int) -> str:
    """The LDM name (without prefix) of the diffusers VAE parameter `name`."""
    name = name.replace("conv_shortcut", "nin_shortcut")
    head, _, tail = name.rpartition(".")
    part, _, rest = head.partition(".")  # part: encoder / decoder / quant_conv / post_quant_conv
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)(.*)", rest):
        side, i, kind, j, sub = m[1], int(m[2]), m[3], m[4], m[5]
        # LDM numbers the decoder's levels from the lowest resolution, diffusers from the highest
        level = i if side == "down" else n_blocks - 1 - i
        what = f"block.{j}" if kind == "resnets" else ("downsample" if side == "down" else "upsample")
        return f"{part}.{side}.{level}.{what}{sub}.{tail}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)(.*)", rest):
        return f"{part}.mid.block_{int(m[1]) + 1}{m[2]}.{tail}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest):
        return f"{part}.mid.attn_1.{VAE_ATTENTION.get(m[1], m[1])}.{tail}"
    if not rest:  # quant_conv, post_quant_conv
        return name
    if rest in ("conv_in", "conv_out", "conv_norm_out"):
        return f"{part}.{VAE_FIXED.get(rest, rest)}.{tail}"
    raise _refuse("VAE", f"parameter {name!r} has no LDM name")


def _vae_tensor(ldm_name: str, tensor: Tensor) -> Tensor:
    """LDM's VAE attention projections are 1x1 convolutions: `[C, C]` -> `[C, C, 1, 1]`."""
    if ".mid.attn_1." in ldm_name and ldm_name.endswith(".weight") and tensor.dim() == 2:
        return tensor[:, :, None, None]
    return tensor


# ------------------------------------------------------------------------------------------------ all
def _convert(
    state: Mapping[str, Tensor], prefix: str, key: Callable[[str], str], shape=lambda _n, t: t
) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        ldm = prefix + key(name)
        if ldm in out:
            raise _refuse(prefix.rstrip("."), f"two parameters map to {ldm!r}")
        out[ldm] = shape(ldm, tensor).detach()
    return out


def ldm_state_dict(unet, vae, text_encoder, text_encoder_2=None) -> dict[str, Tensor]:
    """UNet, VAE and text encoder(s) (diffusers / transformers modules) as one LDM-layout state dict; with
    SDXL's second text encoder, SDXL's layout (`conditioner.embedders.0/1`)."""
    check_backbone(unet.config, vae.config, text_encoder, text_encoder_2)
    n_vae = len(vae.config.down_block_types)
    return {
        **_convert(unet.state_dict(), UNET_PREFIX, lambda n: unet_key(n, unet.config)),
        **_convert(vae.state_dict(), VAE_PREFIX, lambda n: vae_key(n, n_vae), _vae_tensor),
        **text_state_dict(text_encoder, text_encoder_2),
    }

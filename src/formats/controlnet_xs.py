"""The `controlnet_xs/` export: the control encoder as a stock diffusers `ControlNetXSAdapter`.

ControlNet-XS (`UNetControlNetXSModel`) runs a control model beside the base UNet and adds zero-initialised
1x1 convolutions of its features to the base at `conv_in`, after every down sub-block, the mid block and
before every up sub-block. Its first step is

    h_ctrl = ctrl_conv_in(latents) + hint_embedding(condition)
    h_base = base_conv_in(latents) + control_to_base_for_conv_in(h_ctrl) * conditioning_scale

so with `ctrl_conv_in = 0`, `control_to_base_for_conv_in` the identity and every other control-to-base
convolution zero, the base UNet sees `conv_in(latents) + scale * hint_embedding(condition)` and nothing
else of the control model: our injection, with the hint embedding (ControlNet's hint block, the same
layers as our encoder) holding our encoder's weights and `controlnet_conditioning_scale` our strength.
`StableDiffusionControlNetXSPipeline` passes the condition to both classifier-free guidance branches, as
`src.generate` does. The identity transfer needs the control model's first width to equal the UNet's
(320 on SD1.5); its deeper widths are set small (`CTRL_WIDTH`), their compute is wasted but cheap.

What stock diffusers cannot reproduce exactly: it builds the base UNet's ResNet blocks inside
`UNetControlNetXSModel` with GroupNorm eps 1e-6 (diffusers' `ResnetBlock2D` default) where SD's UNet uses
`norm_eps` 1e-5. On full-size SD1.5 components (random weights, 128 px) that moves the images by 6.5e-5 at
most; on narrow test UNets with 1-2 channels per group by up to 0.1. Setting those eps back
(`match_resnet_eps`, a loop of stock diffusers attribute assignments) makes the UNet's output bit-identical. diffusers' UNetControlNetXSModel supports `layers_per_block` 2 only
(SD1.x, SD2.x, SDXL) and a 4-channel `conv_in`; other backbones (the toy and tiny ones have 1) are refused.

The exact alternative on any backbone, `hint_embedding/`: the encoder as diffusers' own
`ControlNetConditioningEmbedding` (`config.json` holds its constructor arguments), whose output a stock
pipeline adds after `conv_in` through a forward hook (README, "Export").
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from src.errors import ConfigError
from src.models.control import ControlEncoder

HINT_WEIGHTS, HINT_CONFIG = "model.safetensors", "config.json"
CTRL_WIDTH = 8  # the control model's widths after the first block: unused by the base, kept small
XS_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")


def check_controlnet_xs(unet, encoder) -> None:
    """Refuse (one line) a UNet diffusers' ControlNet-XS cannot host or an encoder its hint block cannot hold."""
    config = unet.config
    if not isinstance(encoder, ControlEncoder):
        raise ConfigError(
            "a ControlNet-XS adapter holds an OFT-Control encoder (src.models.control.ControlEncoder), this "
            f"run's control is {type(encoder).__name__}: export diffusers/ instead"
        )
    if config.layers_per_block != 2:
        raise ConfigError(
            f"diffusers' UNetControlNetXSModel supports layers_per_block 2 only (SD1.x/2.x/XL) and this "
            f"backbone's UNet has {config.layers_per_block}; the exact stock-diffusers alternative is --formats "
            "hint_embedding (a forward hook after conv_in, README 'Export')"
        )
    odd = sorted(set(config.down_block_types) - set(XS_BLOCKS))
    if odd or config.in_channels != 4 or config.addition_embed_type not in (None, "text_time"):
        raise ConfigError(
            f"diffusers' ControlNet-XS supports {', '.join(XS_BLOCKS)} down blocks, a 4-channel "
            f"conv_in and SD/SDXL embeddings; this UNet has {odd or config.down_block_types}, in_channels "
            f"{config.in_channels}: use --formats hint_embedding (a forward hook after conv_in) instead"
        )


def hint_block_refusal(encoder) -> str | None:
    """Why ControlNet's hint block (both formats here) cannot hold `encoder`'s layers, or None."""
    stem = getattr(encoder, "arguments", {}).get("stem", "conv")
    if stem == "conv":
        return None
    return (
        f"holds ControlNet's hint encoder and this run's encoder has the {stem!r} stem "
        "(module.encoder_stem), which it cannot represent: use diffusers or control_encoder"
    )


def encoder_convolutions(encoder: ControlEncoder) -> list[nn.Conv2d]:
    """The encoder's convolutions in order: the first, the stride-1/stride-2 pairs, then `zero_out`."""
    if why := hint_block_refusal(encoder):
        raise ConfigError(f"this export {why}")
    return [m for m in encoder.body if isinstance(m, nn.Conv2d)] + [encoder.zero_out]


def hint_config(encoder: ControlEncoder) -> dict:
    """Constructor arguments of diffusers' `ControlNetConditioningEmbedding` with the encoder's layers."""
    convs = encoder_convolutions(encoder)
    return {
        "conditioning_embedding_channels": convs[-1].out_channels,
        "conditioning_channels": convs[0].in_channels,
        "block_out_channels": [convs[0].out_channels] + [c.out_channels for c in convs[2:-1:2]],
    }


def load_hint_weights(hint, encoder: ControlEncoder) -> None:
    """Copy the encoder's convolutions into a `ControlNetConditioningEmbedding` (conv_in, blocks, conv_out)."""
    with torch.no_grad():
        for target, source in zip(
            [hint.conv_in, *hint.blocks, hint.conv_out], encoder_convolutions(encoder), strict=True
        ):
            target.load_state_dict(source.state_dict())


def hint_embedding(encoder: ControlEncoder):
    """The encoder as diffusers' own `ControlNetConditioningEmbedding` (ControlNet's hint block: the same
    layers), and its constructor arguments."""
    from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding

    config = hint_config(encoder)
    hint = ControlNetConditioningEmbedding(**config)
    load_hint_weights(hint, encoder)
    return hint.eval(), config


def export_hint_embedding(run, folder: str | os.PathLike) -> Path:
    """Write the control encoder as a `ControlNetConditioningEmbedding`: `config.json` (its constructor
    arguments) + `model.safetensors` (its state dict), for a stock-diffusers forward hook on any backbone."""
    from safetensors.torch import save_file

    encoder = getattr(run.module, "encoder", None)
    if not isinstance(encoder, ControlEncoder):
        raise ConfigError(
            f"hint_embedding holds an OFT-Control encoder; this run's control is {type(encoder).__name__}"
        )
    hint, config = hint_embedding(encoder)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in hint.state_dict().items()}
    meta = {"format": "pt", "condition": run.condition, "resolution": str(run.resolution)}
    save_file(state, folder / HINT_WEIGHTS, metadata=meta)
    (folder / HINT_CONFIG).write_text(json.dumps(config, indent=2))
    return folder


def build_adapter(unet, encoder: ControlEncoder):
    """A `ControlNetXSAdapter` for `unet` whose only effect on the base is `encoder`'s embedding after conv_in."""
    from diffusers import ControlNetXSAdapter

    check_controlnet_xs(unet, encoder)
    widths = hint_config(encoder)["block_out_channels"]
    first = unet.config.block_out_channels[0]
    n_blocks = len(unet.config.block_out_channels)
    heads = unet.config.attention_head_dim
    first_heads = heads[0] if isinstance(heads, (list, tuple)) else heads
    adapter = ControlNetXSAdapter.from_unet(
        unet,
        block_out_channels=[first] + [CTRL_WIDTH] * (n_blocks - 1),
        num_attention_heads=[first_heads] + [1] * (n_blocks - 1),
        conditioning_channels=encoder_convolutions(encoder)[0].in_channels,
        conditioning_embedding_out_channels=tuple(widths),
    )
    with torch.no_grad():
        for param in adapter.parameters():
            param.zero_()
        identity = torch.eye(first, dtype=adapter.dtype).view(first, first, 1, 1)
        adapter.control_to_base_for_conv_in.weight.copy_(identity)
    load_hint_weights(adapter.controlnet_cond_embedding, encoder)
    return adapter.eval()


def export_controlnet_xs(run, folder: str | os.PathLike) -> Path:
    """Write the run's control encoder as a `ControlNetXSAdapter` folder (`config.json` + safetensors)."""
    module = run.module
    adapter = build_adapter(module.unet, getattr(module, "encoder", None))
    folder = Path(folder)
    adapter.save_pretrained(folder, safe_serialization=True)
    return folder


def match_resnet_eps(xs_unet, eps: float) -> None:
    """Give the base ResNet blocks of a `UNetControlNetXSModel` the GroupNorm eps of the UNet they came from
    (diffusers builds them with 1e-6; SD's `norm_eps` is 1e-5). Stock diffusers calls only."""
    from diffusers.models.resnet import ResnetBlock2D

    for name, block in xs_unet.named_modules():
        if isinstance(block, ResnetBlock2D) and "ctrl" not in name:
            block.norm1.eps = block.norm2.eps = eps

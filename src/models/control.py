"""The lightweight control encoder and its injection at the UNet's first feature map.

The encoder follows ControlNet's hint encoder, as the official OFT code uses it (Qiu et al. 2023, sec. 4):
3x3 convolutions with SiLU, channels 3 -> 16 -> 16 -> 32 (stride 2) -> 32 -> 96 (stride 2) -> 96 ->
256 (stride 2) -> C, the last convolution zero-initialised so that at step 0 the controlled model is
exactly the base model. Its output is added to the output of the UNet's `conv_in` through a forward hook
installed for the duration of a call, so no UNet code is copied and the same injection works inside a
stock diffusers pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from src.errors import ConfigError

#: how the encoder reaches the latent resolution (`module.encoder_stem`)
ENCODER_STEMS = ("conv", "unshuffle")


class ControlEncoder(nn.Module):
    """Condition image `[B, C_in, H, W]` in [0, 1] -> embedding `[B, C_out, H / f, W / f]`.

    Two stems reach the latent resolution. `conv` is ControlNet's hint encoder (below): a stride-2 stage per
    factor 2, the first stages narrow and at full resolution. `unshuffle` first folds each f x f patch of the
    condition into channels (`PixelUnshuffle`, as T2I-Adapter's input does), so no pixel is lost to a narrow
    early layer, and then runs the same pairs of convolutions, all at the latent resolution (stride 1).

    Args:
        out_channels: channels of the UNet's first feature map (`unet.conv_in.out_channels`).
        downscale: the VAE's downsampling factor `f` (a power of two); one stride-2 stage per factor 2.
        channels: widths of the stages, one more than the number of stride-2 stages is needed.
        in_channels: channels of the condition image.
        stem: `conv` or `unshuffle` (above); with `unshuffle` the stages keep the latent resolution.
    """

    def __init__(
        self,
        out_channels: int,
        downscale: int = 8,
        channels: Sequence[int] = (16, 32, 96, 256),
        in_channels: int = 3,
        stem: str = "conv",
    ) -> None:
        super().__init__()
        if stem not in ENCODER_STEMS:
            raise ConfigError(
                f"module.encoder_stem {stem!r} is not one of {', '.join(ENCODER_STEMS)}: `conv` (ControlNet's "
                "hint encoder) or `unshuffle` (space-to-depth to the latent resolution, as T2I-Adapter)"
            )
        stages = round(math.log2(downscale))
        if downscale < 1 or 2**stages != downscale:
            raise ConfigError(
                f"control encoder downscale {downscale} is not a power of two (SD's VAE uses 8)"
            )
        if len(channels) < stages + 1:
            raise ConfigError(
                f"control encoder channels {list(channels)} give {len(channels) - 1} stride-2 stages but the "
                f"VAE downscales by {downscale}; give at least {stages + 1} channel widths"
            )
        widths = list(channels[: stages + 1])
        #: the constructor's arguments (what an export records and a loader rebuilds from)
        self.arguments = {
            "out_channels": out_channels,
            "downscale": downscale,
            "channels": widths,
            "in_channels": in_channels,
            "stem": stem,
        }
        if stem == "unshuffle":
            layers: list[nn.Module] = [
                nn.PixelUnshuffle(downscale),
                nn.Conv2d(in_channels * downscale**2, widths[0], 3, padding=1),
                nn.SiLU(),
            ]
        else:
            layers = [nn.Conv2d(in_channels, widths[0], 3, padding=1), nn.SiLU()]
        stride = 1 if stem == "unshuffle" else 2
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=False):
            layers += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.SiLU()]
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, stride=stride), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.zero_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)
        nn.init.zeros_(self.zero_out.weight)
        nn.init.zeros_(self.zero_out.bias)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        if self.training:
            # channels-last lets oneDNN/cuDNN pick faster convolutions: about a fifth of the encoder's forward
            # and backward in a CPU training step. Only the summation order differs, so inference keeps the
            # default layout, whose samples are bit-identical across processes (tests/test_app.py).
            condition = condition.contiguous(memory_format=torch.channels_last)
        return self.zero_out(self.body(condition))


def _broadcast_to_batch(embedding: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeat a `[B, ...]` embedding to a batch of `k * B` (classifier-free guidance doubles the batch)."""
    if batch == embedding.shape[0]:
        return embedding
    if batch % embedding.shape[0]:
        raise ValueError(f"UNet batch {batch} is not a multiple of the control batch {embedding.shape[0]}")
    return embedding.repeat(batch // embedding.shape[0], *([1] * (embedding.dim() - 1)))


@contextmanager
def control_injection(
    unet: nn.Module, encoder: nn.Module, condition: torch.Tensor, strength: Any = 1.0
) -> Iterator[None]:
    """Add `strength * encoder(condition)` to the output of `unet.conv_in` for every call in the block.

    The embedding is computed once when the block is entered (so a sampling loop encodes the condition
    once) and repeated to the UNet's batch: under classifier-free guidance the unconditional branch keeps
    the control, as in the paper. With `strength == 0` the hook is not installed at all, so the output is
    the base model's exactly. An encoder of several conditions (`src.models.multi.MultiEncoder`) takes
    `strength` per condition (a number, a mapping by name, a `[k]` or `[B, k]` tensor) through its `embed`.
    """
    embed = getattr(encoder, "embed", None)  # several conditions (`src.models.multi.MultiEncoder`)
    if embed is None and strength == 0:
        yield
        return
    embedding = embed(condition, strength) if embed is not None else strength * encoder(condition)
    if embedding is None:  # every condition off
        yield
        return
    with added_at_conv_in(unet, embedding):
        yield


@contextmanager
def added_at_conv_in(unet: nn.Module, embedding: torch.Tensor) -> Iterator[None]:
    """Add `embedding` (repeated to the UNet's batch) to the output of `unet.conv_in` for every call in the block."""

    def add_control(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if output.shape[-2:] != embedding.shape[-2:]:
            raise ValueError(
                f"control embedding is {tuple(embedding.shape[-2:])} but the UNet's first feature map is "
                f"{tuple(output.shape[-2:])}: the condition must have the image's resolution"
            )
        return output + _broadcast_to_batch(embedding, output.shape[0]).to(output.dtype)

    handle = unet.conv_in.register_forward_hook(add_control)
    try:
        yield
    finally:
        handle.remove()


def inject_control(
    unet: nn.Module, control: nn.Module, condition: torch.Tensor, strength: float = 1.0
) -> AbstractContextManager:
    """The control of `condition` on `unet` for every call in the block: `control.inject(...)` for a method
    (`src.models.methods`: ControlNet residuals, T2I-Adapter features, the encoder at `conv_in`), or
    `control_injection` for a bare control encoder."""
    inject = getattr(control, "inject", None)
    if inject is not None:
        return inject(unet, condition, strength)
    return control_injection(unet, control, condition, strength)


class ControlPyramid(nn.Module):
    """Multi-scale control, a lever of OFT-Control (`method.multiscale=true`): one zero-initialised 1x1 head per
    down block reads the control encoder's last hidden map, average-pooled to that block's resolution, and its
    output is added at the end of the block (diffusers' `down_intrablock_additional_residuals`, where
    T2I-Adapter's features enter). Zero heads keep the base model at step 0; on SD1.5 (hidden width 256;
    blocks 320, 640, 1280, 1280) the heads add 0.9M parameters to the encoder's 1.1M.
    """

    def __init__(self, width: int, levels: Sequence[int]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Conv2d(width, channels, 1) for channels in levels)
        for head in self.heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        return [head(F.avg_pool2d(hidden, 2**i) if i else hidden) for i, head in enumerate(self.heads)]


@contextmanager
def multiscale_injection(
    unet: nn.Module,
    encoder: ControlEncoder,
    pyramid: ControlPyramid,
    condition: torch.Tensor,
    strength: float,
) -> Iterator[None]:
    """The encoder's embedding at `conv_in` plus the pyramid's features at the end of every down block."""
    if strength == 0:
        yield
        return
    hidden = encoder.body(condition)
    features = [strength * f for f in pyramid(hidden)]

    def residuals(_unet: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        batch = (args[0] if args else kwargs["sample"]).shape[0]  # a fresh list: the UNet pops what it uses
        return args, {
            **kwargs,
            "down_intrablock_additional_residuals": [_broadcast_to_batch(f, batch) for f in features],
        }

    handle = unet.register_forward_pre_hook(residuals, with_kwargs=True)
    try:
        with added_at_conv_in(unet, strength * encoder.zero_out(hidden)):
            yield
    finally:
        handle.remove()

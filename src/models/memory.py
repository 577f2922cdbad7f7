"""Memory and speed switches for the frozen UNet: gradient checkpointing, channels-last, `torch.compile`.

All three are the libraries' own mechanisms, applied once when the module is built:

- **gradient checkpointing**: diffusers' `unet.enable_gradient_checkpointing()` (non-reentrant
  `torch.utils.checkpoint`, so gradients reach the OFT rotations inside the frozen blocks and DDP needs
  neither `find_unused_parameters` nor `static_graph` for it). Recomputes each block's forward in the
  backward: less activation memory, about one more forward of time.
- **channels-last**: the 4-D weights of the UNet, VAE and control encoder in `torch.channels_last`, so
  convolutions run NHWC (faster on tensor-core GPUs; outputs follow the weights' layout).
- **torch.compile**: diffusers' regional compilation `unet.compile_repeated_blocks(...)`, which compiles
  each `BasicTransformerBlock` (where the OFT layers live) once and reuses the code for all of them. The
  control encoder's forward hook on `conv_in` stays outside the compiled regions, so it never forces a
  recompilation.

`benchmarks/README.md` (section "Memory and speed") has the measured effect on SD1.5 shapes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from src.errors import ConfigError

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class MemoryOptions:
    """Switches applied to the frozen backbone when `OFTControlModule` is built (all off by default).

    Args:
        gradient_checkpointing: recompute UNet block activations in the backward instead of storing them.
        channels_last: keep 4-D weights (UNet, VAE, control encoder) in `torch.channels_last` layout.
        compile: compile the UNet's repeated transformer blocks with `torch.compile`.
        compile_mode: `torch.compile` mode (`None`/`"default"`, `"reduce-overhead"`, `"max-autotune"`, ...).
        compile_backend: `torch.compile` backend (`"inductor"`; `"aot_eager"` to debug without codegen).
    """

    gradient_checkpointing: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_mode: str | None = None
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(
                f"module.memory.compile_mode {self.compile_mode!r} is not a torch.compile mode; "
                f"use one of {list(COMPILE_MODES)}"
            )
        if self.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise ConfigError(
                f"module.memory.compile_backend {self.compile_backend!r} is not a torch.compile backend; use "
                f"one of {torch._dynamo.list_backends()} (e.g. module.memory.compile_backend=inductor)"
            )


def enable_gradient_checkpointing(unet: nn.Module) -> None:
    """diffusers' own switch; refuses models that do not support it with a message naming the switch."""
    if not getattr(unet, "_supports_gradient_checkpointing", False):
        raise ConfigError(
            f"{type(unet).__name__} does not support gradient checkpointing: "
            "set module.memory.gradient_checkpointing=false"
        )
    unet.enable_gradient_checkpointing()


def to_channels_last(modules: Iterable[nn.Module]) -> None:
    """Move every 4-D parameter and buffer of `modules` to channels-last layout, in place."""
    for module in modules:
        module.to(memory_format=torch.channels_last)


def compile_blocks(unet: nn.Module, mode: str | None, backend: str) -> None:
    """Regional `torch.compile` of the UNet's repeated blocks (diffusers' `compile_repeated_blocks`)."""
    if not getattr(unet, "_repeated_blocks", None):
        raise ConfigError(
            f"{type(unet).__name__} declares no repeated blocks to compile: set module.memory.compile=false"
        )
    unet.compile_repeated_blocks(mode=None if mode == "default" else mode, backend=backend)


def apply_memory_options(options: MemoryOptions, unet: nn.Module, others: Iterable[nn.Module] = ()) -> None:
    """Apply `options` to the UNet (and, for channels-last, to the other convolutional modules)."""
    if options.gradient_checkpointing:
        enable_gradient_checkpointing(unet)
    if options.channels_last:
        to_channels_last([unet, *others])
    if options.compile:
        compile_blocks(unet, options.compile_mode, options.compile_backend)

"""Sampling with a stock diffusers `StableDiffusionPipeline` (SDXL: `StableDiffusionXLPipeline`) and the control
injection installed."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from src.errors import ConfigError
from src.models.control import inject_control

SCHEDULERS = ("ddim", "unipc", "euler", "ddpm")
DEFAULT_STEPS = {"ddim": 50, "unipc": 20}  # the paper samples with DDIM 50; UniPC is as good in 20


@dataclass(frozen=True)
class SamplingOptions:
    """How images are sampled (the `sampling/` config group): validation samples, generation, evaluation.

    The paper samples with DDIM, 50 steps, guidance 9. Sample `s` of every condition is drawn with seed
    `seed + s`.
    """

    scheduler: str = "ddim"
    num_inference_steps: int | None = None  # None: 50 for DDIM, 20 for UniPC, else 50
    guidance_scale: float = 9.0
    negative_prompt: str | None = None
    # scales the control embedding; 0 switches the control off. With several conditions a mapping by
    # condition name (`sampling.strength.canny=1.0`): src.models.multi
    strength: float | dict[str, float] = 1.0
    seed: int = 0
    num_samples: int = 1
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"unknown scheduler '{self.scheduler}'; choose one of {', '.join(SCHEDULERS)}")
        for name in ("num_samples", "batch_size") + (
            ("num_inference_steps",) if self.num_inference_steps else ()
        ):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        strengths = self.strength.values() if isinstance(self.strength, Mapping) else [self.strength]
        if not all(math.isfinite(float(v)) for v in strengths) or not math.isfinite(self.guidance_scale):
            raise ConfigError(
                f"strength {self.strength} and guidance_scale {self.guidance_scale} must be finite"
            )

    @property
    def steps(self) -> int:
        return int(self.num_inference_steps or DEFAULT_STEPS.get(self.scheduler, 50))


def sampling_options(node: Mapping[str, Any]) -> SamplingOptions:
    """The `sampling` node of an entry config as `SamplingOptions`, raising its own errors (not Hydra's)."""
    from omegaconf import DictConfig, OmegaConf

    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    return SamplingOptions(**{k: v for k, v in values.items() if k != "_target_"})


def make_scheduler(name: str, config: dict):
    """A diffusers sampling scheduler by short name, sharing the backbone's noise schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

    classes = dict(
        ddim=DDIMScheduler, unipc=UniPCMultistepScheduler, euler=EulerDiscreteScheduler, ddpm=DDPMScheduler
    )
    if name not in classes:
        raise ConfigError(f"unknown sampling scheduler '{name}'; choose one of {', '.join(SCHEDULERS)}")
    return classes[name].from_config(config)


def build_pipeline(
    unet: nn.Module,
    vae: nn.Module,
    text_encoder: nn.Module,
    tokenizer,
    scheduler,
    text_encoder_2: nn.Module | None = None,
    tokenizer_2=None,
):
    """A `StableDiffusionPipeline` over the given (possibly OFT-adapted) components, no safety checker; with a
    second text encoder and tokenizer (SDXL), a `StableDiffusionXLPipeline`, no watermark."""
    from diffusers import StableDiffusionPipeline

    if text_encoder_2 is not None:
        from src.models.xl import build_xl_pipeline

        return build_xl_pipeline(unet, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, scheduler)

    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_controlled(
    pipe,
    encoder: nn.Module,
    condition: torch.Tensor,
    prompts: Sequence[str],
    *,
    num_inference_steps: int = 50,
    guidance_scale: float = 9.0,
    negative_prompt: str | Sequence[str] | None = None,
    strength: float | Mapping[str, float] = 1.0,
    generator: torch.Generator | None = None,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Generate one image per prompt under `condition` ([B, 3, H, W] in [0, 1]); returns [B, 3, H, W] in [0, 1].

    `encoder` is the control: a control encoder, or a trained run's method (`src.models.methods`), whatever
    `src.models.control.inject_control` installs.

    The paper samples with DDIM, 50 steps, guidance 9. The control is added in both branches of
    classifier-free guidance. `on_step(i)` is called after denoising step `i` (0-based), e.g. for a
    progress bar.
    """
    if len(prompts) != condition.shape[0]:
        raise ConfigError(f"{len(prompts)} prompts for {condition.shape[0]} condition images")
    height, width = condition.shape[-2:]
    condition = condition.to(pipe.unet.device, pipe.unet.dtype)
    with inject_control(pipe.unet, encoder, condition, strength):
        images = pipe(
            prompt=list(prompts),
            negative_prompt=negative_prompt,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type="pt",
            callback_on_step_end=None if on_step is None else _step_callback(on_step),
        ).images
    return images.float().clamp(0, 1)


def _step_callback(on_step: Callable[[int], None]):
    """A diffusers `callback_on_step_end` that reports the finished step and changes nothing."""

    def callback(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        on_step(step)
        return callback_kwargs

    return callback

"""A trained model ready to sample: from a run directory, one of its checkpoints or an exported folder.

A run is rebuilt with its rotations applied on the fly (`src.models.run.load_run`); an exported
`diffusers/` folder has them merged into the UNet (`src.models.exported`). Either way sampling is a stock
diffusers `StableDiffusionPipeline` with the control injection installed, and the control stays on in
both branches of classifier-free guidance.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from src.models.exported import ENCODER_CONFIG, ENCODER_DIR, is_exported, load_exported
from src.models.run import load_run, locate_run
from src.models.sampling import SamplingOptions, build_pipeline, make_scheduler, sample_controlled


@dataclass
class ControlledModel:
    """What sampling needs: a stock pipeline over the adapted UNet, the control and its task.

    `encoder` is the control: the control encoder of an exported folder, or the method of a run
    (`src.models.methods.Method`: ControlNet, T2I-Adapter, the encoder at `conv_in`, ...).
    """

    pipe: Any
    encoder: nn.Module | Any
    condition: str
    resolution: int
    scheduler_config: Any

    def to(self, device: str | torch.device) -> ControlledModel:
        self.pipe.to(device)
        self.encoder.to(device)
        return self


def load_controlled(
    source: str | os.PathLike, checkpoint: str | None = None, model_path: str | None = None
) -> ControlledModel:
    """From a run directory or checkpoint (rotations applied on the fly) or an exported folder (merged)."""
    if is_exported(source):
        pipe, encoder, config = load_exported(source)
        return ControlledModel(
            pipe, encoder, config["condition"], config["resolution"], pipe.scheduler.config
        )
    run = load_run(source, checkpoint, model_path)
    m = run.module
    scheduler = make_scheduler("ddim", m.noise_scheduler.config)
    pipe = build_pipeline(m.unet, m.vae, m.text_encoder, m.tokenizer, scheduler, **m.second_text_encoder())
    return ControlledModel(pipe, m.method, run.condition, run.resolution, m.noise_scheduler.config)


def describe_source(source: str | os.PathLike, checkpoint: str | None = None) -> tuple[str, int]:
    """`(condition, resolution)` of a run or export, read cheaply from its config (no weights loaded)."""
    if is_exported(source):
        config = json.loads((Path(source) / ENCODER_DIR / ENCODER_CONFIG).read_text())
        return config["condition"], int(config["resolution"])
    cfg = OmegaConf.load(locate_run(source, checkpoint).config)
    return str(cfg.task.condition), int(cfg.model.resolution)


def generate_images(
    model: ControlledModel,
    conditions: torch.Tensor,
    prompts: Sequence[str],
    options: SamplingOptions,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """`[N, num_samples, 3, H, W]` in [0, 1]; image `(n, s)` depends only on its condition, prompt and `seed + s`.

    `progress(done, total)` is called after every denoising step of every pipeline call.
    """
    model.pipe.scheduler = make_scheduler(options.scheduler, model.scheduler_config)
    starts = range(0, len(prompts), options.batch_size)
    total, done = options.num_samples * len(starts) * options.steps, 0

    def on_step(step: int) -> None:
        nonlocal done
        done += 1
        progress(done, total)

    samples = []
    for s in range(options.num_samples):
        batches = []
        for start in starts:
            chunk = slice(start, start + options.batch_size)
            count = len(prompts[chunk])
            generators = [torch.Generator().manual_seed(options.seed + s) for _ in range(count)]
            batches.append(
                sample_controlled(
                    model.pipe,
                    model.encoder,
                    conditions[chunk],
                    prompts[chunk],
                    num_inference_steps=options.steps,
                    guidance_scale=options.guidance_scale,
                    negative_prompt=options.negative_prompt,
                    strength=options.strength,
                    generator=generators,
                    on_step=on_step if progress else None,
                ).cpu()
            )
        samples.append(torch.cat(batches))
    return torch.stack(samples, dim=1)

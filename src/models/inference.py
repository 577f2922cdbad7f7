"""A trained model ready to sample: from a run directory, one of its checkpoints or an exported folder.

A run is rebuilt with its rotations applied on the fly (`src.models.run.load_run`); an exported
`diffusers/` folder has them merged into the UNet (`src.models.exported`). Either way sampling is a stock
diffusers `StableDiffusionPipeline` with the control injection installed, and the control stays on in
both branches of classifier-free guidance.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from src.data.inputs import ConditionInput, collect_inputs
from src.errors import ConfigError
from src.models.exported import ENCODER_CONFIG, ENCODER_DIR, is_exported, load_exported
from src.models.multi import JOIN, compose_runs, split_condition
from src.models.run import load_run, locate_run
from src.models.sampling import SamplingOptions, make_scheduler, sample_controlled


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
    source: str | os.PathLike | Sequence[str],
    checkpoint: str | None = None,
    model_path: str | None = None,
    rotation_scale: Mapping[str, Any] | None = None,
) -> ControlledModel:
    """From a run directory or checkpoint (rotations applied on the fly) or an exported folder (merged); a
    list of runs on one backbone is composed (`src.models.multi.compose_runs`: rotations multiplied and
    merged, one control encoder per condition, each run's rotation scaled by `rotation_scale`)."""
    if not isinstance(source, str | os.PathLike):
        return load_composed(list(source), checkpoint, model_path, rotation_scale)
    if rotation_scale:
        raise ConfigError(
            f"rotation_scale={dict(rotation_scale)} scales the runs of a composition: give run=[A,B], or drop it"
        )
    if is_exported(source):
        pipe, encoder, config = load_exported(source)
        return ControlledModel(
            pipe, encoder, config["condition"], config["resolution"], pipe.scheduler.config
        )
    run = load_run(source, checkpoint, model_path)
    m = run.module
    return ControlledModel(
        m.pipeline("ddim"), m.method, run.condition, run.resolution, m.noise_scheduler.config
    )


def load_composed(
    sources: Sequence[str],
    checkpoint: str | None = None,
    model_path: str | None = None,
    rotation_scale: Mapping[str, Any] | None = None,
) -> ControlledModel:
    """Several runs composed on their common backbone (`src.models.multi`)."""
    if checkpoint is not None and len(sources) > 1:
        raise ConfigError("checkpoint= names one run's checkpoint: pass each run as <run>/checkpoints/<file>")
    composed = compose_runs([load_run(source, checkpoint, model_path) for source in sources], rotation_scale)
    m, encoder = composed.module, composed.encoder
    return ControlledModel(
        m.pipeline("ddim"), encoder, encoder.condition, composed.resolution, m.noise_scheduler.config
    )


def rotation_scale_of(cfg: Any) -> dict[str, Any] | None:
    """A config's `rotation_scale` mapping (`rotation_scale.canny=0.5`), or None when it sets none."""
    node = cfg.get("rotation_scale")
    if node is None or (OmegaConf.is_dict(node) and not node):
        return None
    if not OmegaConf.is_dict(node):
        raise ConfigError(f"rotation_scale={node}: give it per condition, e.g. +rotation_scale.canny=0.5")
    return OmegaConf.to_container(node)


def run_source(node: Any) -> str | list[str]:
    """A config's `run`: one run (a path) or, from `run=[A,B]`, the list of runs to compose."""
    return [str(item) for item in node] if OmegaConf.is_list(node) else node


def describe_source(
    source: str | os.PathLike | Sequence[str], checkpoint: str | None = None
) -> tuple[str, int]:
    """`(condition, resolution)` of a run or export, read cheaply from its config (no weights loaded); of a
    list of runs, their conditions joined (`canny+seg`) and the first one's resolution."""
    if not isinstance(source, str | os.PathLike):
        described = [describe_source(item, checkpoint) for item in source]
        if not described:
            raise ConfigError("run=[] names no run: give a run directory, or a list of runs to compose")
        return JOIN.join(condition for condition, _ in described), described[0][1]
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


def multi_inputs(
    sources: Mapping[str, str] | str, condition: str, resolution: int, limit: int | None, strength: Any
) -> tuple[list[ConditionInput], dict[str, float]]:
    """Inputs for a model of several conditions from `condition.<name>=<source>` (each source as for one
    condition) and the strength of each: `strength` (a number, or a mapping by name; default 1) for the
    conditions given, 0 (not encoded) for the others. The conditions sit side by side, `[3k, H, W]`."""
    names = split_condition(condition)
    if isinstance(sources, str | os.PathLike):  # shards holding every condition's member
        path = Path(sources).expanduser()
        if path.is_file() and path.suffix.lower() != ".tar" or path.is_dir() and not any(path.glob("*.tar")):
            raise ConfigError(
                f"condition '{sources}' is one image source but this model reads {names}: give "
                + " ".join(f"+condition.{name}=<image, folder or shards>" for name in names)
            )
        return collect_inputs(str(sources), condition, resolution, limit), strength
    unknown = sorted(set(sources) - set(names))
    if unknown or not sources:
        raise ConfigError(
            f"condition.{unknown[0] if unknown else '<name>'}: this model reads {names}; give "
            + " ".join(f"+condition.{name}=<image, folder or shards>" for name in names)
        )
    given = {
        name: collect_inputs(str(sources[name]), name, resolution, limit) for name in names if name in sources
    }
    counts = {name: len(items) for name, items in given.items()}
    if len(set(counts.values())) > 1:
        raise ConfigError(f"the conditions have different numbers of images {counts}: give as many of each")
    first = next(iter(given.values()))
    inputs = []
    for i, item in enumerate(first):
        blank = torch.zeros_like(item.condition)
        stacked = torch.cat([given[name][i].condition if name in given else blank for name in names])
        caption = next((given[n][i].caption for n in given if given[n][i].caption is not None), None)
        inputs.append(ConditionInput(item.key, stacked, caption, item.target, item.labels))
    per_name = strength if isinstance(strength, Mapping) else {}
    unknown = sorted(set(per_name) - set(names))
    if unknown:
        raise ConfigError(f"sampling.strength.{unknown[0]}: this model's conditions are {names}")
    default = 1.0 if isinstance(strength, Mapping) else float(strength)
    strengths = {name: float(per_name.get(name, default)) if name in given else 0.0 for name in names}
    return inputs, strengths

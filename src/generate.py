"""Generate images from a trained run: `python -m src.generate` (Hydra; see conf/generate.yaml).

    python -m src.generate run=outputs/canny/runs/<date> condition=edges.png prompt="a red sports car" \
        sampling.num_samples=4 sampling.scheduler=unipc

`run` is a training run directory, one of its checkpoints, or a folder exported by `python -m src.export`;
`condition` an image, a folder of images or a shard spec (whose captions are the default prompts). The
sampler is a stock diffusers `StableDiffusionPipeline` with the control injection installed; the control
stays on in both branches of classifier-free guidance. Writes `images/<key>_<sample>.png`, `grid.png`
(one row per condition: condition | samples) and `generations.json` (prompt and seed of every image).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from src.data import schema
from src.data.pipeline import SampleDecoder, SkipCounter, resolve_shards, to_model_inputs
from src.data.transforms import resize_center_crop
from src.models.sampling import (
    SamplingOptions,
    build_pipeline,
    make_scheduler,
    sample_controlled,
    sampling_options,
)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
GRID_ROWS = 16


@dataclass
class ControlledModel:
    """What sampling needs: a stock pipeline over the adapted UNet, the control encoder and its task."""

    pipe: Any
    encoder: nn.Module
    condition: str
    resolution: int
    scheduler_config: Any

    def to(self, device: str | torch.device) -> ControlledModel:
        self.pipe.to(device)
        self.encoder.to(device)
        return self


def load_controlled(source: str | os.PathLike, checkpoint: str | None = None, model_path: str | None = None
                    ) -> ControlledModel:
    """From a run directory or checkpoint (rotations applied on the fly) or an exported folder (merged)."""
    from src.export import is_exported, load_exported
    from src.models.run import load_run

    if is_exported(source):
        pipe, encoder, config = load_exported(source)
        return ControlledModel(pipe, encoder, config["condition"], config["resolution"], pipe.scheduler.config)
    run = load_run(source, checkpoint, model_path)
    m = run.module
    pipe = build_pipeline(m.unet, m.vae, m.text_encoder, m.tokenizer, make_scheduler("ddim", m.noise_scheduler.config))
    return ControlledModel(pipe, m.encoder, run.condition, run.resolution, m.noise_scheduler.config)


def describe_source(source: str | os.PathLike, checkpoint: str | None = None) -> tuple[str, int]:
    """`(condition, resolution)` of a run or export, read cheaply from its config (no weights loaded)."""
    from src.export import ENCODER_CONFIG, ENCODER_DIR, is_exported
    from src.models.run import locate_run

    if is_exported(source):
        config = json.loads((Path(source) / ENCODER_DIR / ENCODER_CONFIG).read_text())
        return config["condition"], int(config["resolution"])
    cfg = OmegaConf.load(locate_run(source, checkpoint).config)
    return str(cfg.task.condition), int(cfg.model.resolution)


# ----------------------------------------------------------------------------------------------- inputs
@dataclass
class ConditionInput:
    """One condition to generate from; shards also give a caption and the target image (both in [0, 1])."""

    key: str
    condition: torch.Tensor
    caption: str | None = None
    target: torch.Tensor | None = None
    labels: np.ndarray | None = None


def read_condition_image(path: str | os.PathLike, resolution: int, condition: str) -> torch.Tensor:
    """A condition image file -> `[3, R, R]` in [0, 1], resized and centre-cropped as the shards' conditions."""
    from PIL import Image

    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    rgb = resize_center_crop(rgb, resolution, schema.condition_spec(condition).interpolation)
    return torch.tensor(rgb).permute(2, 0, 1).float() / 255.0


def iter_shard_inputs(urls: Sequence[str], condition: str, resolution: int, skips: SkipCounter
                      ) -> Iterator[ConditionInput]:
    """Samples of shards, in order, centre-cropped like validation (labels too, for segmentation)."""
    import webdataset as wds

    decoder = SampleDecoder(condition, resolution, train=False, random_flip=False, seed=0)

    def decode(sample: dict[str, Any]) -> ConditionInput:
        out = to_model_inputs(decoder(sample))
        labels = sample.get(schema.SEGLABEL)
        if labels is not None:
            labels = resize_center_crop(schema.decode_member(schema.SEGLABEL, labels), resolution, "nearest")
        return ConditionInput(out["key"], out["condition"], out["caption"], (out["image"] + 1) / 2, labels)

    yield from wds.DataPipeline(wds.SimpleShardList(list(urls)),
                                wds.tarfile_to_samples(handler=skips, select_files=schema.is_known_member),
                                wds.map(decode, handler=skips))


def collect_inputs(source: str | os.PathLike, condition: str, resolution: int, limit: int | None = None
                   ) -> list[ConditionInput]:
    """Condition inputs from an image file, a folder of images, or a shard spec (tar, brace pattern, glob)."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        inputs = [ConditionInput(path.stem, read_condition_image(path, resolution, condition))]
    elif path.is_dir() and not any(path.glob("*.tar")):
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
        inputs = [ConditionInput(p.relative_to(path).with_suffix("").as_posix().replace("/", "_"),
                                 read_condition_image(p, resolution, condition)) for p in files]
    else:
        stream = iter_shard_inputs(resolve_shards(str(source), "condition"), condition, resolution, SkipCounter())
        inputs = [item for _, item in zip(range(limit or 2**62), stream, strict=False)]
    if not inputs:
        raise ValueError(f"condition '{source}' holds no image ({', '.join(sorted(IMAGE_SUFFIXES))}) or shard sample")
    return inputs[:limit]


def assign_prompts(inputs: Sequence[ConditionInput], prompt: str | Sequence[str] | None) -> list[str]:
    """One prompt per input: a single prompt for all, one per input, or (None) the shards' captions."""
    if prompt is None:
        missing = [item.key for item in inputs if item.caption is None]
        if missing:
            raise ValueError(f"no prompt for {missing[:3]}: image conditions carry no caption, give prompt='...'")
        return [str(item.caption) for item in inputs]
    prompts = [prompt] if isinstance(prompt, str) else [str(p) for p in prompt]
    if len(prompts) not in (1, len(inputs)):
        raise ValueError(f"{len(prompts)} prompts for {len(inputs)} conditions: give one prompt, or one per condition")
    return prompts * len(inputs) if len(prompts) == 1 else prompts


# ----------------------------------------------------------------------------------------------- sampling
def generate_images(model: ControlledModel, conditions: torch.Tensor, prompts: Sequence[str],
                    options: SamplingOptions) -> torch.Tensor:
    """`[N, num_samples, 3, H, W]` in [0, 1]; image `(n, s)` depends only on its condition, prompt and `seed + s`."""
    model.pipe.scheduler = make_scheduler(options.scheduler, model.scheduler_config)
    samples = []
    for s in range(options.num_samples):
        batches = []
        for start in range(0, len(prompts), options.batch_size):
            chunk = slice(start, start + options.batch_size)
            count = len(prompts[chunk])
            generators = [torch.Generator().manual_seed(options.seed + s) for _ in range(count)]
            batches.append(sample_controlled(
                model.pipe, model.encoder, conditions[chunk], prompts[chunk], num_inference_steps=options.steps,
                guidance_scale=options.guidance_scale, negative_prompt=options.negative_prompt,
                strength=options.strength, generator=generators).cpu())
        samples.append(torch.cat(batches))
    return torch.stack(samples, dim=1)


def condition_grid(conditions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """One row per condition: the condition, then its samples (`[N, S, 3, H, W]`), 2-pixel white padding."""
    from torchvision.utils import make_grid

    rows = torch.cat([conditions[:, None].float().cpu(), images.float().cpu()], dim=1)
    return make_grid(rows.flatten(0, 1).clamp(0, 1), nrow=rows.shape[1], padding=2, pad_value=1.0)


def write_outputs(out_dir: Path, inputs: Sequence[ConditionInput], prompts: Sequence[str], images: torch.Tensor,
                  options: SamplingOptions) -> dict[str, Any]:
    """Write every image, the grid (first `GRID_ROWS` conditions) and `generations.json`; returns the record."""
    from torchvision.utils import save_image

    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for item, prompt, row in zip(inputs, prompts, images, strict=True):
        for s, image in enumerate(row):
            name = f"images/{item.key}_{s:02d}.png"
            save_image(image, out_dir / name)
            records.append({"key": item.key, "sample": s, "seed": options.seed + s, "prompt": prompt, "file": name})
    conditions = torch.stack([item.condition for item in inputs[:GRID_ROWS]])
    save_image(condition_grid(conditions, images[:GRID_ROWS]), out_dir / "grid.png")
    record = {"options": asdict(options), "num_inference_steps": options.steps, "images": records,
              "grid": "grid.png"}
    (out_dir / "generations.json").write_text(json.dumps(record, indent=2))
    return record


def generate(cfg: DictConfig) -> dict[str, Any]:
    """Generate from `cfg` (conf/generate.yaml) and write the outputs to `cfg.out_dir`; returns the record."""
    options = sampling_options(cfg.sampling)
    prompt = OmegaConf.to_container(cfg.prompt) if OmegaConf.is_list(cfg.prompt) else cfg.prompt
    condition, resolution = describe_source(cfg.run, cfg.get("checkpoint"))
    inputs = collect_inputs(cfg.condition, condition, resolution, cfg.get("limit"))
    prompts = assign_prompts(inputs, prompt)
    model = load_controlled(cfg.run, cfg.get("checkpoint"), cfg.get("model_path")).to(cfg.device)
    conditions = torch.stack([item.condition for item in inputs])
    images = generate_images(model, conditions, prompts, options)
    out_dir = Path(cfg.out_dir)
    record = write_outputs(out_dir, inputs, prompts, images, options)
    log.info("wrote %d images and %s to %s", len(record["images"]), record["grid"], out_dir)
    return record


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    generate(cfg)


if __name__ == "__main__":
    main()

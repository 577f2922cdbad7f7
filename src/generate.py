"""Generate images from a trained run: `python -m src.generate` (Hydra; see conf/generate.yaml).

    python -m src.generate run=outputs/canny/runs/<date> condition=edges.png prompt="a red sports car" \
        sampling.num_samples=4 sampling.scheduler=unipc

`run` is a training run directory, one of its checkpoints, or a folder exported by `python -m src.export`;
`condition` an image, a folder of images or a shard spec (whose captions are the default prompts); the
`sampling` group (conf/sampling/) sets the sampler. Several conditions (a jointly trained run, or runs
composed on one backbone, `run=[<canny run>,<seg run>]`): one source per condition and a strength each,

    python -m src.generate run=[RUN_A,RUN_B] +condition.canny=edges.png +condition.seg=seg.png \
        sampling.strength='{canny: 1.0, seg: 0.5}'
 Writes `images/<key>_<sample>.png`, `grid.png` (one row
per condition: condition | samples) and `generations.json` (prompt and seed of every image).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from src.data.inputs import ConditionInput, assign_prompts, collect_inputs
from src.data.schema import key_path
from src.errors import take_debug_flag, user_errors
from src.grids import condition_columns, image_grid
from src.models.inference import (
    describe_source,
    generate_images,
    load_controlled,
    multi_inputs,
    rotation_scale_of,
    run_source,
)
from src.models.multi import is_multi
from src.models.sampling import SamplingOptions, sampling_options

log = logging.getLogger(__name__)

GRID_ROWS = 16


def write_outputs(
    out_dir: Path,
    inputs: Sequence[ConditionInput],
    prompts: Sequence[str],
    images: torch.Tensor,
    options: SamplingOptions,
) -> dict[str, Any]:
    """Write every image, the grid (first `GRID_ROWS` conditions) and `generations.json`; returns the record."""
    from torchvision.utils import save_image

    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for item, prompt, row in zip(inputs, prompts, images, strict=True):
        for s, image in enumerate(row):
            path = key_path(out_dir / "images", item.key, f"_{s:02d}.png")  # never outside out_dir/images
            name = path.relative_to(out_dir).as_posix()
            save_image(image, path)
            records.append(
                {"key": item.key, "sample": s, "seed": options.seed + s, "prompt": prompt, "file": name}
            )
    conditions = torch.stack([item.condition for item in inputs[:GRID_ROWS]])
    save_image(image_grid(*condition_columns(conditions), images[:GRID_ROWS]), out_dir / "grid.png")
    record = {
        "options": asdict(options),
        "num_inference_steps": options.steps,
        "images": records,
        "grid": "grid.png",
    }
    (out_dir / "generations.json").write_text(json.dumps(record, indent=2))
    return record


def generate(cfg: DictConfig) -> dict[str, Any]:
    """Generate from `cfg` (conf/generate.yaml) and write the outputs to `cfg.out_dir`; returns the record."""
    options = sampling_options(cfg.sampling)
    prompt = OmegaConf.to_container(cfg.prompt) if OmegaConf.is_list(cfg.prompt) else cfg.prompt
    run = run_source(cfg.run)
    condition, resolution = describe_source(run, cfg.get("checkpoint"))
    if OmegaConf.is_dict(cfg.condition) or is_multi(condition):  # several conditions, a strength each
        sources = OmegaConf.to_container(cfg.condition) if OmegaConf.is_dict(cfg.condition) else cfg.condition
        inputs, strengths = multi_inputs(sources, condition, resolution, cfg.get("limit"), options.strength)
        options = replace(options, strength=strengths)
    else:
        inputs = collect_inputs(cfg.condition, condition, resolution, cfg.get("limit"))
    prompts = assign_prompts(inputs, prompt)
    model = load_controlled(run, cfg.get("checkpoint"), cfg.get("model_path"), rotation_scale_of(cfg))
    model = model.to(cfg.device)
    conditions = torch.stack([item.condition for item in inputs])
    images = generate_images(model, conditions, prompts, options)
    out_dir = Path(cfg.out_dir)
    record = write_outputs(out_dir, inputs, prompts, images, options)
    log.info("wrote %d images and %s to %s", len(record["images"]), record["grid"], out_dir)
    return record


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; errors users cause print one line and exit with status 2."""
    with user_errors():
        generate(cfg)


if __name__ == "__main__":
    take_debug_flag()
    main()

"""Evaluate a trained run on validation shards: `python -m src.evaluate` (Hydra; see conf/evaluate.yaml).

    python -m src.evaluate run=outputs/canny/runs/<date> max_samples=500
    python -m src.evaluate run=outputs/seg/runs/<date> segmenter.model=/models/segformer-b4-ade
    python -m src.evaluate run=... fid.enabled=true clip_score.enabled=true
    python -m src.evaluate run=[CANNY_RUN,SEG_RUN] shards=DIR/val-*.tar   # composed; shards with both members

For each sample the image is generated from the sample's condition and caption, then scored by the task's
controllability metric (docs/design.md, "Metrics": canny IoU/F1, segmentation mIoU, landmark error) and the
optional quality metrics (FID, CLIP score). Writes `metrics.json` (summary, settings and per-sample
values), `metrics.md` (a markdown table) and `best.png` / `worst.png` (condition | generated | target rows
of the best and worst samples by the controllability metric). Everything that can fail for want of
weights or data (segmenter, FID/CLIP weights, shards) is checked before the model is loaded. When not one
sample could be read the reports are still written (valid JSON: `null` for every missing value) and the
command fails with one line naming the skip counts (exit status 2).
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from src.data.inputs import batched, iter_shard_inputs
from src.data.pipeline import SkipCounter, resolve_shards
from src.errors import ConfigError, DataError, take_debug_flag, user_errors
from src.metrics.evaluation import CaseKeeper, build_scorers, eval_samples, score_batch, write_report
from src.models.inference import (
    describe_source,
    generate_images,
    load_controlled,
    rotation_scale_of,
    run_source,
)
from src.models.run import validation_shards
from src.models.sampling import sampling_options

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Generate and score up to `cfg.max_samples` validation samples; write the reports to `cfg.out_dir`."""
    options = sampling_options(cfg.sampling)
    run = run_source(cfg.run)  # a list: composed
    condition, resolution = describe_source(run, cfg.checkpoint)
    if cfg.shards is None and not isinstance(run, str):
        raise ConfigError("runs composed (run=[...]) have no one validation set: set shards=DIR/val-*.tar")
    urls = (
        resolve_shards(cfg.shards, "shards")
        if cfg.shards is not None
        else validation_shards(run, cfg.checkpoint)
    )
    scorers = build_scorers(cfg, condition)
    model = load_controlled(run, cfg.checkpoint, cfg.model_path, rotation_scale_of(cfg)).to(cfg.device)
    keeper = CaseKeeper(cfg.cases, scorers[0].higher_is_better)
    skips, records = SkipCounter("eval"), []
    stream = itertools.islice(iter_shard_inputs(urls, condition, resolution, skips), cfg.max_samples)
    for batch in batched(stream, options.batch_size):
        samples = eval_samples(batch)
        generated = generate_images(
            model, torch.stack([b.condition for b in batch]), [s.caption for s in samples], options
        )[:, 0]
        for item, image, values in zip(
            batch, generated, score_batch(scorers, generated, samples), strict=True
        ):
            row = torch.stack([*item.condition.split(3), image, item.target])  # each condition, then images
            keeper.add(values.get(scorers[0].primary), item.key, row)
            records.append({"key": item.key, "caption": item.caption, **values})
    report = write_report(cfg, scorers, keeper, records, dict(skips.counts), options)
    if not records:
        raise DataError(
            f"nothing was evaluated: no readable sample in {len(urls)} shard(s) "
            f"(skipped: {dict(skips.counts) or 'none'}); reports with empty metrics are in {cfg.out_dir}"
        )
    return report


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; errors users cause print one line and exit with status 2."""
    with user_errors():
        evaluate(cfg)


if __name__ == "__main__":
    take_debug_flag()
    main()

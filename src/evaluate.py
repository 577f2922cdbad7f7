"""Evaluate a trained run on validation shards: `python -m src.evaluate` (Hydra; see conf/evaluate.yaml).

    python -m src.evaluate run=outputs/canny/runs/<date> max_samples=500
    python -m src.evaluate run=outputs/seg/runs/<date> segmenter.model=/models/segformer-b4-ade
    python -m src.evaluate run=... fid.enabled=true clip_score.enabled=true

For each sample the image is generated from the sample's condition and caption, then scored by the task's
controllability metric (docs/design.md, "Metrics": canny IoU/F1, segmentation mIoU, landmark error) and the
optional quality metrics (FID, CLIP score). Writes `metrics.json` (summary, settings and per-sample
values), `metrics.md` (a markdown table) and `best.png` / `worst.png` (condition | generated | target rows
of the best and worst samples by the controllability metric). Everything that can fail for want of
weights or data (segmenter, FID/CLIP weights, shards) is checked before the model is loaded.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from src.data.inputs import batched, iter_shard_inputs
from src.data.pipeline import SkipCounter, resolve_shards
from src.metrics.base import Scorer
from src.metrics.evaluation import (
    CaseKeeper,
    build_scorers,
    eval_samples,
    markdown_table,
    save_cases,
    score_batch,
)
from src.models.inference import describe_source, generate_images, load_controlled
from src.models.run import validation_shards
from src.models.sampling import SamplingOptions, sampling_options

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Generate and score up to `cfg.max_samples` validation samples; write the reports to `cfg.out_dir`."""
    options = sampling_options(cfg.sampling)
    condition, resolution = describe_source(cfg.run, cfg.checkpoint)
    urls = (
        resolve_shards(cfg.shards, "shards")
        if cfg.shards is not None
        else validation_shards(cfg.run, cfg.checkpoint)
    )
    scorers = build_scorers(cfg, condition)
    model = load_controlled(cfg.run, cfg.checkpoint, cfg.model_path).to(cfg.device)
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
            keeper.add(
                values.get(scorers[0].primary), item.key, torch.stack([item.condition, image, item.target])
            )
            records.append({"key": item.key, "caption": item.caption, **values})
    return write_report(cfg, scorers, keeper, records, dict(skips.counts), options)


def write_report(
    cfg: DictConfig,
    scorers: Sequence[Scorer],
    keeper: CaseKeeper,
    records: list[dict[str, Any]],
    skipped: dict[str, int],
    options: SamplingOptions,
) -> dict[str, Any]:
    """`metrics.json`, `metrics.md`, `best.png` and `worst.png` in `cfg.out_dir`; returns the json content."""
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = {k: v for scorer in scorers for k, v in scorer.summary().items()}
    header = {
        "run": str(cfg.run),
        "samples": len(records),
        "skipped": skipped or 0,
        "sampler": f"{options.scheduler} {options.steps} steps, guidance {options.guidance_scale}",
        "strength": options.strength,
        "ranked by": scorers[0].primary,
    }
    report = {
        "metrics": metrics,
        **header,
        "sampling": dataclasses.asdict(options),
        "best": save_cases(keeper.best(), out_dir / "best.png"),
        "worst": save_cases(keeper.worst(), out_dir / "worst.png"),
        "per_sample": records,
    }
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2, default=float))
    (out_dir / "metrics.md").write_text(markdown_table(metrics, header))
    log.info("%s", json.dumps(metrics))
    return report


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    evaluate(cfg)


if __name__ == "__main__":
    main()

"""Evaluate a trained run on validation shards: `python -m src.evaluate` (Hydra; see conf/evaluate.yaml).

    python -m src.evaluate run=outputs/canny/runs/<date> max_samples=500
    python -m src.evaluate run=outputs/seg/runs/<date> segmenter.model=/models/segformer-b4-ade
    python -m src.evaluate run=... fid.enabled=true clip_score.enabled=true

For each sample the image is generated from the sample's condition and caption, then scored by the task's
controllability metric (DESIGN.md section 5: canny IoU/F1, segmentation mIoU, landmark error) and the
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
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.callbacks.samples import sample_grid
from src.data.pipeline import SkipCounter, resolve_shards
from src.generate import (
    ConditionInput,
    describe_source,
    generate_images,
    iter_shard_inputs,
    load_controlled,
)
from src.metrics import (
    CannyScorer,
    EvalSample,
    FaceLandmarker,
    LandmarkScorer,
    Scorer,
    SegmentationScorer,
    Segmenter,
)
from src.metrics.base import to_uint8
from src.metrics.quality import CLIPScorer, FIDScorer, build_clip_score, build_fid
from src.models.sampling import sampling_options

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- scorers
def control_scorer(cfg: DictConfig, condition: str) -> Scorer:
    """The controllability scorer of a condition (loads the segmenter for `seg`)."""
    builders: dict[str, Callable[[], Scorer]] = {
        "canny": lambda: CannyScorer(cfg.canny.low, cfg.canny.high),
        "seg": lambda: SegmentationScorer(
            Segmenter(cfg.segmenter.model, cfg.segmenter.label_offset, cfg.device),
            cfg.segmenter.num_classes, cfg.segmenter.ignore_index),
        "landmarks": lambda: LandmarkScorer(FaceLandmarker(cfg.landmarks.detect_resolution,
                                                           cfg.landmarks.min_confidence)),
    }
    if condition not in builders:
        raise ValueError(f"no controllability metric for condition '{condition}'; known: {sorted(builders)}")
    return builders[condition]()


def build_scorers(cfg: DictConfig, condition: str) -> list[Scorer]:
    """The controllability scorer, then FID and CLIP score when enabled (each fails clearly without weights)."""
    scorers = [control_scorer(cfg, condition)]
    if cfg.fid.enabled:
        extractor = instantiate(cfg.fid.extractor) if cfg.fid.extractor else None
        scorers.append(FIDScorer(build_fid(cfg.fid.feature, extractor, cfg.fid.weights_path)))
    if cfg.clip_score.enabled:
        scorers.append(CLIPScorer(build_clip_score(cfg.clip_score.model)))
    return scorers


# ----------------------------------------------------------------------------------------------- data
def evaluation_shards(cfg: DictConfig) -> list[str]:
    """`cfg.shards`, or the run's validation shards (built first if the run used the offline demo data)."""
    if cfg.shards is not None:
        return resolve_shards(cfg.shards, "shards")
    from src.models.run import locate_run

    try:
        data = OmegaConf.load(locate_run(cfg.run, cfg.checkpoint).config).data
    except FileNotFoundError:  # an exported folder has no run config
        raise ValueError(f"'{cfg.run}' has no training config to take validation shards from: set shards=...") from None
    if not data.get("val_shards"):
        raise ValueError(f"the run of '{cfg.run}' had no data.val_shards: set shards=DIR/val-*.tar")
    if data.get("prepare"):
        instantiate(data.prepare)()  # the offline demo data, built once
    return resolve_shards(data.val_shards, "data.val_shards", data.get("root"))


def batched(items: Iterable[ConditionInput], size: int) -> Iterator[list[ConditionInput]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def eval_samples(batch: Sequence[ConditionInput]) -> list[EvalSample]:
    targets = to_uint8(torch.stack([item.target for item in batch]))
    conditions = to_uint8(torch.stack([item.condition for item in batch]))
    return [EvalSample(item.key, item.caption or "", target, condition, item.labels)
            for item, target, condition in zip(batch, targets, conditions, strict=True)]


# ----------------------------------------------------------------------------------------------- cases
class CaseKeeper:
    """Keeps the `k` best and `k` worst samples by one per-sample value (rows of condition, generated, target)."""

    def __init__(self, k: int, higher_is_better: bool = True) -> None:
        self.k, self.sign = k, 1.0 if higher_is_better else -1.0
        self.cases: list[tuple[float, str, torch.Tensor]] = []

    def add(self, value: float | None, key: str, row: torch.Tensor) -> None:
        if value is None or math.isnan(value) or self.k == 0:
            return
        self.cases.append((self.sign * value, key, row))
        self.cases.sort(key=lambda case: case[0], reverse=True)
        if len(self.cases) > 2 * self.k:
            del self.cases[self.k:-self.k]

    def best(self) -> list[tuple[float, str, torch.Tensor]]:
        return [(self.sign * v, key, row) for v, key, row in self.cases[: self.k]]

    def worst(self) -> list[tuple[float, str, torch.Tensor]]:
        return [(self.sign * v, key, row) for v, key, row in self.cases[::-1][: self.k]]


def save_cases(cases: Sequence[tuple[float, str, torch.Tensor]], path: Path) -> str | None:
    """One row per case: condition | generated | target."""
    from torchvision.utils import save_image

    if not cases:
        return None
    rows = torch.stack([row for _, _, row in cases])
    save_image(sample_grid(rows[:, 0], rows[:, 1], rows[:, 2]), path)
    return path.name


# ----------------------------------------------------------------------------------------------- reports
def _format(value: float) -> str:
    """Counts as integers, everything else with four decimals."""
    return str(int(value)) if math.isfinite(value) and float(value).is_integer() else f"{value:.4f}"


def markdown_table(metrics: dict[str, float], header: dict[str, Any]) -> str:
    lines = [f"- {key}: {value}" for key, value in header.items()] + ["", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {_format(value)} |" for name, value in metrics.items()]
    return "\n".join(lines) + "\n"


def score_batch(scorers: Sequence[Scorer], generated: torch.Tensor, samples: Sequence[EvalSample]
                ) -> list[dict[str, float]]:
    """Per-sample values of every scorer, merged into one dict per sample."""
    images = to_uint8(generated)
    merged: list[dict[str, float]] = [{} for _ in samples]
    for scorer in scorers:
        for values, more in zip(merged, scorer.score_batch(images, samples), strict=True):
            values.update(more)
    return merged


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Generate and score up to `cfg.max_samples` validation samples; write the reports to `cfg.out_dir`."""
    options = sampling_options(cfg.sampling)
    condition, resolution = describe_source(cfg.run, cfg.checkpoint)
    urls = evaluation_shards(cfg)
    scorers = build_scorers(cfg, condition)
    model = load_controlled(cfg.run, cfg.checkpoint, cfg.model_path).to(cfg.device)
    keeper = CaseKeeper(cfg.cases, scorers[0].higher_is_better)
    skips, records = SkipCounter("eval"), []
    stream = itertools.islice(iter_shard_inputs(urls, condition, resolution, skips), cfg.max_samples)
    for batch in batched(stream, options.batch_size):
        samples = eval_samples(batch)
        generated = generate_images(model, torch.stack([b.condition for b in batch]),
                                    [s.caption for s in samples], options)[:, 0]
        for item, image, values in zip(batch, generated, score_batch(scorers, generated, samples), strict=True):
            keeper.add(values.get(scorers[0].primary), item.key, torch.stack([item.condition, image, item.target]))
            records.append({"key": item.key, "caption": item.caption, **values})
    return write_report(cfg, scorers, keeper, records, dict(skips.counts), options)


def write_report(cfg: DictConfig, scorers: Sequence[Scorer], keeper: CaseKeeper, records: list[dict[str, Any]],
                 skipped: dict[str, int], options: Any) -> dict[str, Any]:
    """`metrics.json`, `metrics.md`, `best.png` and `worst.png` in `cfg.out_dir`; returns the json content."""
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = {k: v for scorer in scorers for k, v in scorer.summary().items()}
    header = {"run": str(cfg.run), "samples": len(records), "skipped": skipped or 0,
              "sampler": f"{options.scheduler} {options.steps} steps, guidance {options.guidance_scale}",
              "strength": options.strength, "ranked by": scorers[0].primary}
    report = {"metrics": metrics, **header, "sampling": dataclasses.asdict(options),
              "best": save_cases(keeper.best(), out_dir / "best.png"),
              "worst": save_cases(keeper.worst(), out_dir / "worst.png"), "per_sample": records}
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

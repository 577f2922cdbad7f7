"""Scoring generated images over a validation set: the task's scorers, per-sample values, best and worst cases.

`src.evaluate` composes these: `build_scorers` picks the controllability scorer of the run's condition
(plus FID and CLIP score when enabled), `score_batch` merges every scorer's per-sample values,
`CaseKeeper` remembers the best and worst samples by the primary metric, and `markdown_table` renders the
summary.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from src.data.inputs import ConditionInput
from src.errors import ConfigError
from src.grids import image_grid
from src.metrics.base import EvalSample, Scorer, to_uint8
from src.metrics.edges import CannyScorer
from src.metrics.landmarks import FaceLandmarker, LandmarkScorer
from src.metrics.quality import CLIPScorer, FIDScorer, build_clip_score, build_fid
from src.metrics.segmentation import SegmentationScorer, Segmenter, ToyJudgeScorer
from src.models.multi import split_condition
from src.models.sampling import SamplingOptions

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- scorers
def control_scorer(cfg: DictConfig, condition: str) -> Scorer:
    """The controllability scorer of a condition (loads the segmenter for `seg`)."""
    builders: dict[str, Callable[[], Scorer]] = {
        "canny": lambda: CannyScorer(cfg.canny.low, cfg.canny.high),
        "seg": lambda: (
            ToyJudgeScorer()
            if cfg.segmenter.model == "toy"
            else SegmentationScorer(
                Segmenter(cfg.segmenter.model, cfg.segmenter.label_offset, cfg.device),
                cfg.segmenter.num_classes,
                cfg.segmenter.ignore_index,
            )
        ),
        "landmarks": lambda: LandmarkScorer(
            FaceLandmarker(cfg.landmarks.detect_resolution, cfg.landmarks.min_confidence)
        ),
    }
    if condition not in builders:
        raise ConfigError(f"no controllability metric for condition '{condition}'; known: {sorted(builders)}")
    return builders[condition]()


def build_scorers(cfg: DictConfig, condition: str) -> list[Scorer]:
    """The controllability scorer (one per condition of a multi-condition model, `canny+seg`), then FID and
    CLIP score when enabled (each fails clearly without weights)."""
    scorers = [control_scorer(cfg, name) for name in split_condition(condition)]
    if cfg.fid.enabled:
        extractor = instantiate(cfg.fid.extractor) if cfg.fid.extractor else None
        scorers.append(FIDScorer(build_fid(cfg.fid.feature, extractor, cfg.fid.weights_path)))
    if cfg.clip_score.enabled:
        scorers.append(CLIPScorer(build_clip_score(cfg.clip_score.model)))
    return scorers


def eval_samples(batch: Sequence[ConditionInput]) -> list[EvalSample]:
    """Shard inputs as the scorers see them (uint8 images)."""
    targets = to_uint8(torch.stack([item.target for item in batch]))
    conditions = to_uint8(torch.stack([item.condition for item in batch]))
    return [
        EvalSample(item.key, item.caption or "", target, condition, item.labels)
        for item, target, condition in zip(batch, targets, conditions, strict=True)
    ]


def score_batch(
    scorers: Sequence[Scorer], generated: torch.Tensor, samples: Sequence[EvalSample]
) -> list[dict[str, float]]:
    """Per-sample values of every scorer, merged into one dict per sample."""
    images = to_uint8(generated)
    merged: list[dict[str, float]] = [{} for _ in samples]
    for scorer in scorers:
        for values, more in zip(merged, scorer.score_batch(images, samples), strict=True):
            values.update(more)
    return merged


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
            del self.cases[self.k : -self.k]

    def best(self) -> list[tuple[float, str, torch.Tensor]]:
        return [(self.sign * v, key, row) for v, key, row in self.cases[: self.k]]

    def worst(self) -> list[tuple[float, str, torch.Tensor]]:
        return [(self.sign * v, key, row) for v, key, row in self.cases[::-1][: self.k]]


def save_cases(cases: Sequence[tuple[float, str, torch.Tensor]], path: Path) -> str | None:
    """One row per case: condition | generated | target; returns the file name (None without cases)."""
    from torchvision.utils import save_image

    if not cases:
        return None
    save_image(image_grid(torch.stack([row for _, _, row in cases])), path)
    return path.name


# ----------------------------------------------------------------------------------------------- reports
def _format(value: float | None) -> str:
    """Counts as integers, everything else with four decimals; a missing value as `-`."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return str(int(value)) if float(value).is_integer() else f"{value:.4f}"


def json_safe(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None (JSON has no NaN: `null` is missing),
    tensors and numpy scalars turned into numbers, tuples into lists."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, bool | str | int) or value is None:
        return value
    if hasattr(value, "item"):  # torch / numpy scalars
        value = value.item()
    if isinstance(value, float | int):
        return value if math.isfinite(value) else None
    return str(value)


def write_report(
    cfg: DictConfig,
    scorers: Sequence[Scorer],
    keeper: CaseKeeper,
    records: list[dict[str, Any]],
    skipped: dict[str, int],
    options: SamplingOptions,
) -> dict[str, Any]:
    """`metrics.json`, `metrics.md`, `best.png` and `worst.png` in `cfg.out_dir`; returns the json content.

    `metrics.json` is strict JSON: missing values (a metric over no sample) are `null`, never `NaN`.
    """
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = json_safe({k: v for scorer in scorers for k, v in scorer.summary().items()})
    header = {
        "run": str(cfg.run),
        "samples": len(records),
        "skipped": skipped or 0,
        "sampler": f"{options.scheduler} {options.steps} steps, guidance {options.guidance_scale}",
        "strength": options.strength,
        "ranked by": scorers[0].primary,
    }
    report = json_safe(
        {
            "metrics": metrics,
            **header,
            "sampling": dataclasses.asdict(options),
            "best": save_cases(keeper.best(), out_dir / "best.png"),
            "worst": save_cases(keeper.worst(), out_dir / "worst.png"),
            "per_sample": records,
        }
    )
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    (out_dir / "metrics.md").write_text(markdown_table(metrics, header))
    log.info("%s", json.dumps(metrics))
    return report


def markdown_table(metrics: dict[str, float], header: dict[str, Any]) -> str:
    """`- key: value` lines for `header`, then a `| metric | value |` table."""
    lines = [f"- {key}: {value}" for key, value in header.items()] + ["", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {_format(value)} |" for name, value in metrics.items()]
    return "\n".join(lines) + "\n"

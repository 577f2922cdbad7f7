"""A cheap controllability metric during training, logged beside the validation loss, with its chance level.

At each validation the module generates from the first `max_images` validation samples (with its own
`generate`: the validation sampler and seed; the first batch's images are the ones the sample grid shows)
and scores them with the evaluation's metric:

- canny: F1 and IoU of `Canny(100, 200)` edges against the targets' (`val/canny_f1`, `val/canny_iou`), and the
  same images against the other samples' targets (`val/canny_f1_chance`: what an image that ignores its
  condition scores, averaged over every mismatched pairing);
- landmarks: landmark error and face detection rate (`val/landmark_error_px`, `val/landmark_detection_rate`);
- segmentation, when the captions are toy-world captions: the toy judge's shape mIoU of the generated images
  against the targets' class maps (`val/seg_miou`, chance `val/seg_miou_chance` over every mismatched
  pairing; real datasets need a pretrained segmenter, too heavy for a training loop: run
  `python -m src.evaluate` on checkpoints);
- and for every task, when the captions are toy-world captions, the toy judge's caption fidelity
  (`val/caption_colour_acc`, `val/caption_shape_acc`, `val/caption_object_acc`).

With `per_condition` on, each validation also writes `<run>/conditions/step_<step>.json`: the sample keys and,
per condition, canny F1 (or the toy judge's shape mIoU of that image alone) and its chance level (the same
image against every other sample's target), and the toy judge's caption fidelity of that image: what
`benchmarks.controllability` bootstraps its intervals from.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl

from src.data.schema import condition_spec
from src.metrics import CannyScorer, EvalSample, LandmarkScorer, Scorer
from src.metrics.base import to_uint8
from src.models.multi import split_condition

log = logging.getLogger(__name__)

#: condition -> (scorer factory, summary values to log)
CHEAP_METRICS: dict[str, tuple[Callable[[], Scorer], tuple[str, ...]]] = {
    "canny": (CannyScorer, ("canny_f1", "canny_iou")),
    "landmarks": (LandmarkScorer, ("landmark_error_px", "landmark_detection_rate")),
}


def _shifts(images: list) -> list[list]:
    """Every cyclic shift but the identity: over them, each image meets every other sample's target once."""
    return [images[k:] + images[:k] for k in range(1, len(images))]


def chance_level(score: Callable[[list], float], targets: list) -> float:
    """Mean of `score` over every pairing of the images with the other samples' targets (all n - 1 cyclic
    shifts): the chance level, far less noisy on 16 images than a single mismatched pairing."""
    return float(np.mean([score(shifted) for shifted in _shifts(targets)]))


def toy_captions(captions: list[str]) -> bool:
    """True if every caption follows the toy world's grammar (the judge can score its image)."""
    from src.toy.world import parse_caption

    try:
        for caption in captions:
            parse_caption(caption)
    except ValueError:
        return False
    return True


def toy_metrics(
    generated: list[np.ndarray], targets: list[np.ndarray], captions: list[str], conditions: list[str]
) -> dict[str, float]:
    """The toy judge's caption fidelity and (with a segmentation among `conditions`) shape mIoU with its
    chance level; {} if the captions are not toy-world captions."""
    from src.toy import judge as toy

    if not toy_captions(captions):
        return {}
    fidelity = toy.caption_fidelity(generated, captions)
    values = {f"caption_{k}": fidelity[k] for k in ("colour_acc", "shape_acc", "object_acc")}
    if "seg" in conditions and len(generated) > 1:
        predicted, labels = [toy.segment(g) for g in generated], [toy.segment(t) for t in targets]
        values["seg_miou"] = toy.shape_miou(predicted, labels)
        values["seg_miou_chance"] = chance_level(lambda other: toy.shape_miou(predicted, other), labels)
    return values


def per_condition_scores(
    generated: list[np.ndarray], targets: list[np.ndarray], condition: str
) -> dict[str, list[float]]:
    """Per condition: its score and its chance level (the mean over every other sample's target), for canny
    (F1 of each image) and segmentation (the toy judge's shape mIoU of each image alone); {} otherwise."""
    if condition == "canny":
        from src.metrics.edges import canny_iou_f1

        def score(image: np.ndarray, target: np.ndarray) -> float:
            return canny_iou_f1(image, target)[1]

        name = "canny_f1"
    elif condition == "seg":
        from src.toy import judge as toy

        predicted, targets = [toy.segment(g) for g in generated], [toy.segment(t) for t in targets]
        generated, name = predicted, "seg_miou"

        def score(image: np.ndarray, target: np.ndarray) -> float:
            return toy.shape_miou([image], [target])

    else:
        return {}
    n = len(generated)
    own = [score(generated[i], targets[i]) for i in range(n)]
    chance = [
        float(np.mean([score(generated[i], targets[(i + k) % n]) for k in range(1, n)]))
        if n > 1
        else float("nan")
        for i in range(n)
    ]
    return {name: [float(v) for v in own], f"{name}_chance": chance}


def per_condition_fidelity(generated: list[np.ndarray], captions: list[str]) -> dict[str, list[float]]:
    """Per condition, the toy judge's caption fidelity of its image (`caption_colour_acc`, ...); {} when the
    captions are not toy-world captions."""
    from src.toy import judge as toy

    if not toy_captions(captions):
        return {}
    scores = [toy.judge(image, caption) for image, caption in zip(generated, captions, strict=True)]
    names = ("colour_acc", "shape_acc", "object_acc")
    return {f"caption_{k}": [float(s[k]) for s in scores] for k in names}


def controllability_summary(metrics: dict[str, float]) -> list[str]:
    """`val/<metric> value (chance c, r x)` for every logged metric that has a chance level."""
    lines = []
    for name, value in metrics.items():
        chance = metrics.get(f"{name}_chance")
        if name.startswith("val/") and chance is not None:
            ratio = f", {value / chance:.2f}x" if chance > 0 else ""
            lines.append(f"{name} {value:.4f} (chance {chance:.4f}{ratio})")
    return lines


class ControllabilityMetric(pl.Callback):
    """Logs `val/<metric>` of the task's cheap controllability metric (and its chance level) at every validation.

    Args:
        condition: the task's condition (`${task.condition}`).
        max_images: how many validation samples (from the first batches) are generated and scored.
        num_inference_steps: sampling steps, None for the module's validation sampler setting.
        per_condition: also write each condition's score and chance level to
            `<run>/conditions/step_<step>.json` (canny and segmentation; see the module docstring).
    """

    def __init__(
        self,
        condition: str,
        max_images: int = 16,
        num_inference_steps: int | None = None,
        per_condition: bool = False,
    ) -> None:
        self.names = split_condition(condition)  # several with a multi-condition task: each is scored
        for name in self.names:
            condition_spec(name)
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        self.condition, self.max_images, self.num_inference_steps = condition, max_images, num_inference_steps
        self.per_condition = per_condition
        self._reset()

    def _reset(self) -> None:
        self.generated: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.captions: list[str] = []
        self.keys: list[str] = []

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        n = min(self.max_images - len(self.generated), len(batch["caption"]))
        if trainer.sanity_checking or n <= 0:
            return
        if self.num_inference_steps:  # a sampler of its own: generate separately
            generated = pl_module.generate(
                batch["condition"][:n], batch["caption"][:n], num_inference_steps=self.num_inference_steps
            )
        else:  # the validation generations the sample grid shows (batch 0), drawn once
            generated = pl_module.validation_samples(batch, n)
        self.generated += to_uint8(generated)
        self.targets += to_uint8((batch["image"][:n].float() + 1) / 2)
        self.captions += list(batch["caption"][:n])
        self.keys += [str(k) for k in list(batch.get("key", []))[:n]]

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.generated:
            return
        values = self.scores()
        pl_module.log_dict(
            {f"val/{k}": float(v) for k, v in values.items()},
            on_step=False,
            on_epoch=True,
            batch_size=len(self.generated),
            sync_dist=True,
        )
        if self.per_condition and trainer.is_global_zero:
            self.write_per_condition(Path(trainer.default_root_dir), trainer.global_step)
        self._reset()

    def write_per_condition(self, run_dir: Path, step: int) -> Path:
        """`run_dir/conditions/step_<step>.json`: the sample keys and every per-condition score."""
        values = {}
        for name in self.names:
            values |= per_condition_scores(self.generated, self.targets, name)
        values |= per_condition_fidelity(self.generated, self.captions)
        keys = (
            self.keys
            if len(self.keys) == len(self.generated)
            else [str(i) for i in range(len(self.generated))]
        )
        path = run_dir / "conditions" / f"step_{step:06d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"step": step, "keys": keys, **values}) + "\n")
        return path

    def scores(self) -> dict[str, float]:
        """Every metric of the collected generations (see the module docstring)."""
        values: dict[str, float] = {}
        for name in self.names:
            if name in CHEAP_METRICS:
                values |= self._score(self.targets, name)
                if name == "canny" and len(self.targets) > 1:
                    values["canny_f1_chance"] = chance_level(
                        lambda t, name=name: self._score(t, name)["canny_f1"], self.targets
                    )
        return values | toy_metrics(self.generated, self.targets, self.captions, self.names)

    def _score(self, targets: list[np.ndarray], condition: str) -> dict[str, float]:
        factory, logged = CHEAP_METRICS[condition]
        scorer = factory()
        keys = self.keys if len(self.keys) == len(targets) else [str(i) for i in range(len(targets))]
        scorer.score_batch(self.generated, [EvalSample(k, "", t) for k, t in zip(keys, targets, strict=True)])
        return {name: value for name, value in scorer.summary().items() if name in logged}

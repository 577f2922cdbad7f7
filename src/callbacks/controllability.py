"""A cheap controllability metric during training, logged beside the validation loss.

At each validation the module generates from the first few samples of the first validation batch (with its
own `generate`: the validation sampler and seed) and scores the images against their targets with the
evaluation's metric: canny F1 and IoU for canny (`val/canny_f1`, `val/canny_iou`), landmark error and face
detection rate for landmarks (`val/landmark_error_px`, `val/landmark_detection_rate`). Segmentation needs a
pretrained segmenter, too heavy for a training loop: run `python -m src.evaluate` on checkpoints instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch

from src.data.schema import condition_spec
from src.metrics import CannyScorer, EvalSample, LandmarkScorer, Scorer
from src.metrics.base import to_uint8

log = logging.getLogger(__name__)

#: condition -> (scorer factory, summary values to log)
CHEAP_METRICS: dict[str, tuple[Callable[[], Scorer], tuple[str, ...]]] = {
    "canny": (CannyScorer, ("canny_f1", "canny_iou")),
    "landmarks": (LandmarkScorer, ("landmark_error_px", "landmark_detection_rate")),
}


def controllability(generated: torch.Tensor, targets: torch.Tensor, condition: str,
                    keys: list[str] | None = None) -> dict[str, float]:
    """The cheap metric of `condition` for generated and target images `[N, 3, H, W]` in [0, 1]."""
    factory, logged = CHEAP_METRICS[condition]
    scorer = factory()
    keys = keys or [str(i) for i in range(len(targets))]
    samples = [EvalSample(key, "", target) for key, target in zip(keys, to_uint8(targets), strict=True)]
    scorer.score_batch(to_uint8(generated), samples)
    return {name: value for name, value in scorer.summary().items() if name in logged}


class ControllabilityMetric(pl.Callback):
    """Logs `val/<metric>` of the task's cheap controllability metric at every validation.

    Args:
        condition: the task's condition (`${task.condition}`); conditions without a cheap metric log nothing.
        max_images: how many samples of the first validation batch are generated and scored.
        num_inference_steps: sampling steps, None for the module's validation sampler setting.
    """

    def __init__(self, condition: str, max_images: int = 4, num_inference_steps: int | None = None) -> None:
        condition_spec(condition)
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        self.condition, self.max_images, self.num_inference_steps = condition, max_images, num_inference_steps
        if condition not in CHEAP_METRICS:
            log.info("no cheap controllability metric for condition '%s'; use python -m src.evaluate", condition)

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx != 0 or trainer.sanity_checking or self.condition not in CHEAP_METRICS:
            return
        n = min(self.max_images, len(batch["caption"]))
        if self.num_inference_steps:  # a sampler of its own: generate separately
            generated = pl_module.generate(batch["condition"][:n], batch["caption"][:n],
                                           num_inference_steps=self.num_inference_steps)
        else:  # the validation generations the sample grid shows, drawn once
            generated = pl_module.validation_samples(batch, n)
        targets = (batch["image"][:n].float() + 1) / 2
        values = controllability(generated, targets, self.condition, list(batch.get("key", []))[:n] or None)
        pl_module.log_dict({f"val/{k}": float(v) for k, v in values.items()}, on_step=False, on_epoch=True,
                           batch_size=n, sync_dist=True)

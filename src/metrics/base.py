"""What every scorer sees (an evaluation sample and a generated image) and what it returns."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class EvalSample:
    """One validation sample at the evaluation resolution.

    Attributes:
        key: the shard key.
        caption: the prompt it was generated with.
        target: ground-truth image, RGB uint8 `[H, W, 3]`.
        condition: the condition image, RGB uint8 `[H, W, 3]` (for grids).
        labels: ground-truth class indices `[H, W]` (segmentation only).
    """

    key: str
    caption: str
    target: np.ndarray
    condition: np.ndarray | None = None
    labels: np.ndarray | None = None


class Scorer(ABC):
    """Accumulates one metric over generated images.

    `score_batch` returns per-sample values (a dict per sample, possibly empty when a sample has no value,
    e.g. no face found); `summary` returns the dataset-level values. `primary` names the per-sample value
    used to rank best and worst cases (None for set-level metrics such as FID).
    """

    name: str = "metric"
    primary: str | None = None
    higher_is_better: bool = True

    def score(self, generated: np.ndarray, sample: EvalSample) -> dict[str, float]:
        """Per-sample values of one generated RGB uint8 image against its sample."""
        return self.score_batch([generated], [sample])[0]

    @abstractmethod
    def score_batch(
        self, generated: Sequence[np.ndarray], samples: Sequence[EvalSample]
    ) -> list[dict[str, float]]:
        """Per-sample values of a batch; updates the running summary."""

    @abstractmethod
    def summary(self) -> dict[str, float]:
        """Dataset-level values over everything scored so far."""


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """`[N, 3, H, W]` floats in [0, 1] -> N RGB uint8 arrays `[H, W, 3]` (rounded, as PNG writers do)."""
    array = (
        images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )
    return [np.ascontiguousarray(a) for a in array]


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean, NaN for no values (so an empty metric is visibly missing, not zero)."""
    return float(np.mean(values)) if len(values) else float("nan")

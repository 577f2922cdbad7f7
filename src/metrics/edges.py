"""Canny controllability (the paper's protocol): Canny(100, 200) on the generated and the source image,
then per-image IoU and F1 of the two binary edge maps, averaged over images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from src.data.annotators import CANNY_HIGH, CANNY_LOW, canny_edges
from src.metrics.base import EvalSample, Scorer, mean


def binary_iou_f1(predicted: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """IoU `TP / (TP + FP + FN)` and F1 `2TP / (2TP + FP + FN)` of two binary maps (nonzero = positive).

    Two empty maps agree perfectly: IoU = F1 = 1.
    """
    if predicted.shape != target.shape:
        raise ValueError(f"edge maps differ in shape: {predicted.shape} vs {target.shape}")
    p, t = predicted != 0, target != 0
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))
    if tp + fp + fn == 0:
        return 1.0, 1.0
    return tp / (tp + fp + fn), 2 * tp / (2 * tp + fp + fn)


def canny_iou_f1(
    generated: np.ndarray, source: np.ndarray, low: int = CANNY_LOW, high: int = CANNY_HIGH
) -> tuple[float, float]:
    """IoU and F1 of `Canny(low, high)` edges of two RGB uint8 images of the same size."""
    return binary_iou_f1(canny_edges(generated, low, high), canny_edges(source, low, high))


class CannyScorer(Scorer):
    """Mean per-image canny IoU and F1 (`canny_iou`, `canny_f1`) of generated against source images."""

    name, primary, higher_is_better = "canny", "canny_f1", True

    def __init__(self, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> None:
        if not 0 <= low <= high:
            raise ValueError(
                f"canny thresholds low={low}, high={high} must satisfy 0 <= low <= high (paper: 100, 200)"
            )
        self.low, self.high = low, high
        self.ious: list[float] = []
        self.f1s: list[float] = []

    def score_batch(
        self, generated: Sequence[np.ndarray], samples: Sequence[EvalSample]
    ) -> list[dict[str, float]]:
        values = []
        for image, sample in zip(generated, samples, strict=True):
            iou, f1 = canny_iou_f1(image, sample.target, self.low, self.high)
            self.ious.append(iou)
            self.f1s.append(f1)
            values.append({"canny_iou": iou, "canny_f1": f1})
        return values

    def summary(self) -> dict[str, float]:
        return {
            "canny_iou": mean(self.ious),
            "canny_f1": mean(self.f1s),
            "canny_images": float(len(self.f1s)),
        }

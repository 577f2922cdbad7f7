"""Segmentation controllability: segment the generated image with a pretrained segmenter (the paper used
SegFormer-B4 on ADE20K) and report mIoU against the ground-truth labels.

mIoU follows the usual semantic-segmentation protocol: one confusion matrix accumulated over the whole
set, `IoU_c = TP_c / (TP_c + FP_c + FN_c)` per class, averaged over the classes that occur (in the labels
or the predictions); pixels labelled `ignore_index` (ADE20K's 0, "other") are left out.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from src.errors import MissingInputError
from src.metrics.base import EvalSample, Scorer, mean


class SegmenterNotFoundError(MissingInputError):
    """The segmenter's weights are neither a local folder nor in the local hub cache."""


def confusion_matrix(
    predicted: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int | None = None
) -> np.ndarray:
    """`[num_classes, num_classes]` pixel counts, rows the true class, columns the predicted class."""
    if predicted.shape != target.shape:
        raise ValueError(f"prediction {predicted.shape} and labels {target.shape} differ in shape")
    p, t = predicted.astype(np.int64).ravel(), target.astype(np.int64).ravel()
    keep = t >= 0 if ignore_index is None else (t >= 0) & (t != ignore_index)
    if np.any(t[keep] >= num_classes) or np.any((p[keep] < 0) | (p[keep] >= num_classes)):
        raise ValueError(
            f"labels or predictions outside [0, {num_classes}): set num_classes to cover every class"
        )
    counts = np.bincount(num_classes * t[keep] + p[keep], minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def mean_iou(confusion: np.ndarray) -> tuple[float, np.ndarray]:
    """mIoU and the per-class IoU (NaN for classes absent from both labels and predictions)."""
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = np.full(len(tp), np.nan)
    np.divide(tp, union, out=iou, where=union > 0)
    return (float(np.nanmean(iou)) if np.any(union > 0) else float("nan")), iou


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


class Segmenter:
    """A pretrained semantic segmenter loaded with transformers (`AutoModelForSemanticSegmentation`:
    SegFormer, UperNet, BEiT, DPT...), mapping RGB uint8 images to class-index maps of the same size.

    Args:
        model: a local folder or a hub id (cached, or downloadable when online), e.g.
            `nvidia/segformer-b4-finetuned-ade-512-512`.
        label_offset: added to predicted indices to match the labels (1 for ADE20K, whose 150 model classes
            are labels 1..150, 0 being "other").
    """

    def __init__(self, model: str, label_offset: int = 1, device: str | torch.device = "cpu") -> None:
        from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

        self.label_offset, self.device = label_offset, torch.device(device)
        options = dict(local_files_only=_offline())
        try:
            self.processor = AutoImageProcessor.from_pretrained(model, **options)
            self.model = AutoModelForSemanticSegmentation.from_pretrained(model, **options)
        except OSError as err:
            raise SegmenterNotFoundError(
                f"segmenter weights '{model}' are not available locally ({type(err).__name__}): set "
                "segmenter.model to a local folder holding a transformers segmentation model (e.g. a download "
                "of nvidia/segformer-b4-finetuned-ade-512-512), or run once online to cache it"
            ) from None
        self.model.to(self.device).eval()

    @property
    def num_labels(self) -> int:
        return int(self.model.config.num_labels)

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Class-index maps `[H, W]` (int64, offset applied) at each image's own size."""
        inputs = self.processor(images=list(images), return_tensors="pt")
        logits = self.model(pixel_values=inputs["pixel_values"].to(self.device)).logits
        maps = []
        for image, logit in zip(images, logits, strict=True):
            full = F.interpolate(
                logit[None].float(), size=image.shape[:2], mode="bilinear", align_corners=False
            )
            maps.append(full[0].argmax(0).cpu().numpy() + self.label_offset)
        return maps


class SegmentationScorer(Scorer):
    """mIoU (`seg_miou`) and pixel accuracy of segmented generated images against the shards' labels.

    Per-sample values are the image's own mIoU (used to rank best and worst cases).
    """

    name, primary, higher_is_better = "segmentation", "seg_miou", True

    def __init__(
        self, segmenter: Segmenter, num_classes: int | None = None, ignore_index: int | None = 0
    ) -> None:
        self.segmenter = segmenter
        self.num_classes = num_classes or segmenter.num_labels + segmenter.label_offset
        self.ignore_index = ignore_index
        self.total = np.zeros((self.num_classes, self.num_classes), np.int64)
        self.per_image: list[float] = []

    def score_batch(
        self, generated: Sequence[np.ndarray], samples: Sequence[EvalSample]
    ) -> list[dict[str, float]]:
        missing = [s.key for s in samples if s.labels is None]
        if missing:
            raise ValueError(
                f"samples {missing[:3]} have no seglabel.png: segmentation mIoU needs label maps in the shards"
            )
        values = []
        for predicted, sample in zip(self.segmenter(generated), samples, strict=True):
            confusion = confusion_matrix(predicted, sample.labels, self.num_classes, self.ignore_index)
            self.total += confusion
            image_miou = mean_iou(confusion)[0]
            self.per_image.append(image_miou)
            values.append({"seg_miou": image_miou})
        return values

    def summary(self) -> dict[str, float]:
        miou, _ = mean_iou(self.total)
        accuracy = np.trace(self.total) / max(int(self.total.sum()), 1)
        return {
            "seg_miou": miou,
            "seg_pixel_accuracy": float(accuracy),
            "seg_image_miou_mean": mean(self.per_image),
            "seg_images": float(len(self.per_image)),
        }


class ToyJudgeScorer(Scorer):
    """The toy world's segmentation score (`segmenter.model=toy`): the judge's shape mIoU of each generated
    image against its target image, both segmented by `src.toy.judge.segment`, as validation scores it. The
    toy backbone draws coloured shapes, which no ADE20K segmenter knows."""

    name, primary, higher_is_better = "segmentation", "seg_miou", True

    def __init__(self) -> None:
        self.per_image: list[float] = []

    def score_batch(
        self, generated: Sequence[np.ndarray], samples: Sequence[EvalSample]
    ) -> list[dict[str, float]]:
        from src.toy import judge

        values = []
        for image, sample in zip(generated, samples, strict=True):
            value = judge.shape_miou([judge.segment(image)], [judge.segment(sample.target)])
            self.per_image.append(value)
            values.append({"seg_miou": value})
        return values

    def summary(self) -> dict[str, float]:
        return {"seg_miou": mean(self.per_image)}

"""The toy-world judge: parse a generated scene into coloured blobs and name each blob's colour and shape.

A pixel belongs to a shape when it is saturated enough (HSV saturation and value above thresholds: the
toy world's backgrounds are light greys); its colour is the toy colour of nearest hue. Each connected
region of one colour larger than ``min_area`` is a blob, named by how much of its bounding box it fills:
a square fills all of it, a disc pi/4 = 0.785, a triangle 1/2. From the blobs:

- ``caption_fidelity``: colour, shape and object accuracy and count accuracy against the captions
  (the paper's "semantic preservation", measured on the toy world), and the dominant colour accuracy;
- ``segment``: a class map (0 background, 1 circle, 2 square, 3 triangle) for mIoU against label maps.

Compare every figure with its chance level: the same images judged against shuffled captions or other
label maps.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from src.toy.world import COLOURS, SHAPE_CLASS, SHAPES, parse_caption

#: OpenCV hue (0..180) of each toy colour.
HUES: dict[str, float] = {
    name: float(cv2.cvtColor(np.uint8([[rgb]]), cv2.COLOR_RGB2HSV)[0, 0, 0]) for name, rgb in COLOURS.items()
}


@dataclass(frozen=True)
class Blob:
    """A connected region of one colour: its colour, shape, area (pixels), bounding-box fill and mask."""

    colour: str
    shape: str
    area: int
    fill: float
    mask: np.ndarray


def colour_map(rgb: np.ndarray, min_saturation: int = 90, min_value: int = 70) -> np.ndarray:
    """Per pixel: the index of the toy colour of nearest hue, or -1 for background."""
    hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV).astype(np.float32)
    hue = hsv[..., 0:1]
    refs = np.array(list(HUES.values()), np.float32)
    distance = np.abs(hue - refs)
    distance = np.minimum(distance, 180.0 - distance)
    index = distance.argmin(axis=-1).astype(np.int64)
    foreground = (hsv[..., 1] >= min_saturation) & (hsv[..., 2] >= min_value)
    return np.where(foreground, index, -1)


def name_shape(fill: float) -> str:
    """Shape from the fraction of its bounding box a blob fills (midpoints between 1/2, pi/4 and 1)."""
    if fill >= 0.89:
        return "square"
    return "circle" if fill >= 0.64 else "triangle"


def parse_scene(rgb: np.ndarray, min_area: int | None = None) -> list[Blob]:
    """The blobs of a scene, largest first. ``min_area`` defaults to 0.4% of the image."""
    min_area = min_area if min_area is not None else max(4, int(0.004 * rgb.shape[0] * rgb.shape[1]))
    colours = colour_map(rgb)
    blobs = []
    for index, name in enumerate(COLOURS):
        mask = (colours == index).astype(np.uint8)
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((2, 2), np.uint8))
        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        for label in range(1, count):
            _, _, width, height, area = (int(v) for v in stats[label])
            if area < min_area:
                continue
            fill = area / float(width * height)
            blobs.append(Blob(name, name_shape(fill), area, fill, labels == label))
    return sorted(blobs, key=lambda b: -b.area)


def segment(rgb: np.ndarray) -> np.ndarray:
    """Class map of a scene: each blob's pixels get its shape's class, the rest 0."""
    labels = np.zeros(rgb.shape[:2], np.uint8)
    for blob in reversed(parse_scene(rgb)):  # largest last, so it wins where blobs touch
        labels[blob.mask] = SHAPE_CLASS[blob.shape]
    return labels


def _matched(expected: Sequence[str], found: Sequence[str]) -> int:
    """How many of ``expected`` are in ``found``, as multisets."""
    return sum((Counter(expected) & Counter(found)).values())


def judge(rgb: np.ndarray, caption: str) -> dict[str, float]:
    """Per-image fidelity to a toy caption: fractions of its objects found by colour, by shape and as
    (colour, shape) pairs, whether the count matches, and whether the dominant colour is named."""
    expected = parse_caption(caption)
    blobs = parse_scene(rgb)
    areas = Counter()
    for blob in blobs:
        areas[blob.colour] += blob.area
    dominant = areas.most_common(1)[0][0] if areas else None
    n = len(expected)
    return {
        "colour_acc": _matched([c for c, _ in expected], [b.colour for b in blobs]) / n,
        "shape_acc": _matched([s for _, s in expected], [b.shape for b in blobs]) / n,
        "object_acc": _matched(expected, [(b.colour, b.shape) for b in blobs]) / n,
        "count_acc": float(len(blobs) == n),
        "dominant_colour_acc": float(dominant in {c for c, _ in expected}),
    }


def caption_fidelity(images: Sequence[np.ndarray], captions: Sequence[str]) -> dict[str, float]:
    """Mean of ``judge`` over images and their captions."""
    if len(images) != len(captions) or not images:
        raise ValueError(
            f"need as many captions as images (got {len(images)} images, {len(captions)} captions)"
        )
    scores = [judge(image, caption) for image, caption in zip(images, captions, strict=True)]
    return {key: float(np.mean([s[key] for s in scores])) for key in scores[0]}


def shuffled(captions: Sequence[str], seed: int = 0) -> list[str]:
    """The captions in a seeded random order: judging images against them gives the chance level."""
    order = np.random.default_rng(seed).permutation(len(captions))
    return [captions[i] for i in order]


def single_shape_captions(count: int) -> list[str]:
    """``count`` single-shape captions cycling through every (colour, shape) pair."""
    pairs = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
    return [pairs[i % len(pairs)] for i in range(count)]


def backbone_fidelity(
    folder: str | Path,
    count: int = 48,
    seed: int = 0,
    steps: int = 50,
    guidance_scale: float = 7.5,
    batch_size: int = 16,
) -> dict[str, float]:
    """Caption fidelity of a toy backbone loaded with stock ``StableDiffusionPipeline.from_pretrained``:
    ``count`` single-shape captions, DDIM ``steps``, against their captions and against shuffled ones."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    captions = single_shape_captions(count)
    images: list[np.ndarray] = []
    for start in range(0, count, batch_size):
        batch = captions[start : start + batch_size]
        generator = [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch))]
        out = pipe(
            batch,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type="np",
        )
        images += [(np.clip(image, 0, 1) * 255).round().astype(np.uint8) for image in out.images]
    own, chance = caption_fidelity(images, captions), caption_fidelity(images, shuffled(captions, seed))
    return {
        "captions": count,
        "sampler": f"DDIM {steps} steps, guidance {guidance_scale}",
        **{f"single_{k}": round(v, 3) for k, v in own.items()},
        **{f"single_{k}_shuffled": round(v, 3) for k, v in chance.items()},
    }


def shape_miou(predicted: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> float:
    """mIoU over the shape classes (1 circle, 2 square, 3 triangle), pixels pooled over images; every
    pixel counts, so shapes drawn on the background are false positives."""
    from src.metrics.segmentation import confusion_matrix, mean_iou

    total = sum(confusion_matrix(p, t, len(SHAPES) + 1) for p, t in zip(predicted, labels, strict=True))
    _, iou = mean_iou(total)
    return float(np.nanmean(iou[1:])) if np.any(~np.isnan(iou[1:])) else float("nan")

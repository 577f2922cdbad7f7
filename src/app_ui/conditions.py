"""Condition images from what a user uploads or draws, prepared as the converters prepare the shards'.

A condition image is used as it is (resized and centre-cropped exactly as `python -m src.generate` reads a
condition file, `src.data.inputs.condition_from_rgb`), or first annotated the way the converters annotate
a source image: for canny, a photo becomes its edge map (`src.data.annotators.canny_edges` on the image
resized to the run's resolution, as the COCO converter does); for segmentation, every colour is snapped to the
nearest ADE20K palette colour (`src.data.palette`), so anti-aliased strokes become class colours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from src.data.annotators import CANNY_HIGH, CANNY_LOW, canny_edges
from src.data.inputs import condition_from_rgb
from src.data.palette import ADE20K_CLASSES, palette_lut
from src.data.transforms import resize_center_crop

#: how an input image becomes the condition: "auto" annotates only what is not a condition already.
MODES = ("auto", "as is", "annotate")
ANNOTATION = {"canny": "photo -> canny edges", "seg": "snap colours to the ADE20K palette"}
MAX_SIDE = 4096


@dataclass(frozen=True)
class PreparedCondition:
    """The condition the model gets (`[3, R, R]` in [0, 1]) and how it was made, in words."""

    tensor: torch.Tensor
    note: str


def to_rgb(image: np.ndarray) -> np.ndarray:
    """An uploaded or drawn image (grey, RGB or RGBA, uint8 or float in [0, 1]) as RGB uint8 [H, W, 3].

    Transparent pixels are composited onto black, the background of every condition type.
    """
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3) or image.size == 0:
        raise ValueError(
            f"expected an image array [H, W] or [H, W, C], got {getattr(image, 'shape', type(image))}"
        )
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected 1, 3 or 4 channels, got an image of shape {image.shape}")
    if max(image.shape[:2]) > MAX_SIDE or min(image.shape[:2]) < 8:
        raise ValueError(
            f"image of {image.shape[1]}x{image.shape[0]} px: use one between 8 and {MAX_SIDE} px a side"
        )
    if image.dtype != np.uint8:
        image = (np.clip(image.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
    if image.shape[2] == 4:
        alpha = image[..., 3:].astype(np.float64) / 255
        image = (image[..., :3] * alpha).round().astype(np.uint8)
    return np.ascontiguousarray(np.broadcast_to(image[..., :3], (*image.shape[:2], 3)))


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """`[3, H, W]` in [0, 1] -> RGB uint8 [H, W, 3], rounded as `torchvision.utils.save_image` rounds."""
    return image.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()


def looks_like_edge_map(rgb: np.ndarray) -> bool:
    """Grey, nearly binary and mostly dark: white edges (or drawn lines) on black, as canny conditions are."""
    grey = int((rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2)).max()) <= 16
    levels = rgb.mean(axis=2)
    mid = np.mean((levels > 48) & (levels < 208))
    return bool(grey and mid <= 0.1 and levels.mean() < 96)


def snap_to_palette(rgb: np.ndarray) -> np.ndarray:
    """Every pixel replaced by the nearest colour of the ADE20K palette (or black, class 0)."""
    lut = palette_lut()[: len(ADE20K_CLASSES) + 1].astype(np.int32)  # 0: black, k: class k
    flat = rgb.reshape(-1, 1, 3).astype(np.int32)
    nearest = np.empty(flat.shape[0], np.intp)
    for start in range(0, flat.shape[0], 65536):  # [chunk, 151] distances, a few MB at a time
        chunk = flat[start : start + 65536]
        nearest[start : start + 65536] = ((chunk - lut[None]) ** 2).sum(-1).argmin(1)
    return lut[nearest].reshape(rgb.shape).astype(np.uint8)


def prepare_condition(
    image: np.ndarray, condition: str, resolution: int, mode: str = "auto"
) -> PreparedCondition:
    """The condition tensor for `image` under the run's `condition` and `resolution` (see the module doc).

    `mode`: "as is" resizes the image as a condition file; "annotate" annotates it first (canny: a photo
    to edges; seg: colours snapped to the palette; landmarks: as is); "auto" annotates for canny only
    when the image is not an edge map already, and always snaps segmentation colours (a no-op on a
    palette map).
    """
    if mode not in MODES:
        raise ValueError(f"unknown condition mode {mode!r}; choose one of {', '.join(MODES)}")
    rgb = to_rgb(image)
    annotate = mode == "annotate" or (mode == "auto" and (condition == "seg" or not looks_like_edge_map(rgb)))
    if condition == "canny" and annotate:
        photo = resize_center_crop(rgb, resolution)
        edges = canny_edges(photo)
        note = f"photo -> canny edges (cv2.Canny {CANNY_LOW}/{CANNY_HIGH} at {resolution} px)"
        return PreparedCondition(
            condition_from_rgb(np.repeat(edges[..., None], 3, 2), resolution, condition), note
        )
    tensor = condition_from_rgb(rgb, resolution, condition)
    if condition == "seg" and annotate:
        snapped = snap_to_palette(to_uint8(tensor))
        return PreparedCondition(
            torch.tensor(snapped).permute(2, 0, 1).float() / 255.0,
            f"colours snapped to the ADE20K palette at {resolution} px",
        )
    return PreparedCondition(tensor, f"used as a {condition} condition, resized to {resolution} px")


def palette_classes(labels: list[np.ndarray], limit: int = 12) -> list[tuple[int, str, str]]:
    """`(class, name, "#rrggbb")` of the classes most frequent in `labels` (all palette classes if none)."""
    counts = np.zeros(len(ADE20K_CLASSES) + 1, np.int64)
    for label in labels:
        counts += np.bincount(label.ravel().astype(np.intp), minlength=counts.size)[: counts.size]
    counts[0] = 0
    order = [int(k) for k in np.argsort(-counts, kind="stable") if counts[k] > 0] or list(range(1, limit + 1))
    lut = palette_lut()
    return [(k, ADE20K_CLASSES[k - 1], "#{:02x}{:02x}{:02x}".format(*lut[k])) for k in order[:limit]]

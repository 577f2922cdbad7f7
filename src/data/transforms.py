"""Geometric transforms on numpy images, applied identically to a target and its condition."""

from __future__ import annotations

import cv2
import numpy as np

_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST,
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
}


def resize_shorter(array: np.ndarray, size: int, interpolation: str = "auto") -> np.ndarray:
    """Resize so the shorter side is ``size``, keeping the aspect ratio.

    ``interpolation``: ``"auto"`` (area when shrinking, cubic when enlarging: photos), ``"nearest"``
    (label maps, palettes, renderings), ``"area"``, ``"linear"`` or ``"cubic"``.
    """
    height, width = array.shape[:2]
    scale = size / min(height, width)
    if scale == 1.0:
        return array
    new_w = size if width <= height else max(size, round(width * scale))
    new_h = size if height < width else max(size, round(height * scale))
    if interpolation == "auto":
        interpolation = "area" if scale < 1.0 else "cubic"
    if interpolation == "area" and scale > 1.0:
        interpolation = "linear"  # INTER_AREA enlarges like nearest; linear is the honest choice
    return cv2.resize(array, (new_w, new_h), interpolation=_INTERPOLATION[interpolation])


def crop(array: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    """Square crop of side ``size`` at (top, left)."""
    return array[top : top + size, left : left + size]


def hflip(array: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Left-right mirror as a new contiguous array, or written into ``out`` (a C-contiguous uint8 array
    of ``array``'s shape). ``cv2.flip``: copying a ``[:, ::-1]`` view of an interleaved RGB image is
    several times slower."""
    if out is None:
        return cv2.flip(array, 1)
    if out.shape != array.shape or out.dtype != array.dtype or not out.flags.c_contiguous:
        raise ValueError(
            f"out has shape {out.shape} {out.dtype}; expected a contiguous {array.shape} {array.dtype}"
        )
    cv2.flip(array, 1, dst=out)
    return out


def center_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of the centred ``size`` x ``size`` crop."""
    return (height - size) // 2, (width - size) // 2


def random_offsets(height: int, width: int, size: int, rng: np.random.Generator) -> tuple[int, int]:
    """(top, left) of a uniformly random ``size`` x ``size`` crop."""
    return int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))


def resize_center_crop(array: np.ndarray, size: int, interpolation: str = "auto") -> np.ndarray:
    """Resize the shorter side to ``size`` then take the centred square crop (the converters' resize)."""
    resized = resize_shorter(array, size, interpolation)
    return np.ascontiguousarray(crop(resized, *center_offsets(*resized.shape[:2], size), size))

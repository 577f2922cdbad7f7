"""Condition annotators shared by the converters and evaluation."""

from __future__ import annotations

import cv2
import numpy as np

CANNY_LOW = 100
CANNY_HIGH = 200


def canny_edges(rgb: np.ndarray, low: int = CANNY_LOW, high: int = CANNY_HIGH, on: str = "gray") -> np.ndarray:
    """Binary edge map (uint8, 0/255, H x W) of an RGB uint8 image: ``cv2.Canny(x, low, high)``.

    ``on="gray"`` runs Canny on ``cv2.cvtColor(rgb, COLOR_RGB2GRAY)`` (this project's default);
    ``on="rgb"`` runs it on the colour image directly (cv2 then takes the strongest channel gradient),
    as ControlNet's annotator does.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"canny_edges expects an RGB uint8 image, got {rgb.dtype} {rgb.shape}")
    if on not in ("gray", "rgb"):
        raise ValueError(f"canny 'on' must be 'gray' or 'rgb', got {on!r}")
    source = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if on == "gray" else np.ascontiguousarray(rgb)
    return cv2.Canny(source, low, high)

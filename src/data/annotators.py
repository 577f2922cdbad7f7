"""Condition annotators shared by the converters and evaluation.

The converters make the shards' conditions with these functions and the metrics measure generated images
with the same ones, so a metric provably uses the annotator that made the conditions.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

import cv2
import numpy as np

CANNY_LOW = 100
CANNY_HIGH = 200
#: controlnet-aux `MediapipeFaceDetector`'s `min_face_size_pixels` (a test checks that they agree)
MIN_FACE_SIZE = 64


def canny_edges(
    rgb: np.ndarray, low: int = CANNY_LOW, high: int = CANNY_HIGH, on: str = "gray"
) -> np.ndarray:
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


@lru_cache(maxsize=4)
def _face_mesh(max_faces: int, min_confidence: float, pid: int):
    """One MediaPipe FaceMesh per process and setting (built on first use; `pid` keeps forks from sharing one)."""
    import mediapipe as mp

    return mp.solutions.face_mesh.FaceMesh(
        static_image_mode=True,
        max_num_faces=max_faces,
        refine_landmarks=True,
        min_detection_confidence=min_confidence,
    )


def detect_faces(
    rgb: np.ndarray, max_faces: int = 1, min_confidence: float = 0.5, min_face_size: int = MIN_FACE_SIZE
) -> list[Any]:
    """MediaPipe FaceMesh landmark lists (478 points with irises) of the faces in an RGB uint8 image.

    The settings are controlnet-aux `MediapipeFaceDetector`'s: static images, refined landmarks, and faces
    whose landmarks span less than `min_face_size` pixels in width or height ignored. Points are
    normalised to [0, 1] (`p.x * width`, `p.y * height` are pixels). MediaPipe's model files ship inside
    its wheel, so this runs offline.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"face detection expects an RGB uint8 image, got {rgb.dtype} {rgb.shape}")
    found = (
        _face_mesh(max_faces, min_confidence, os.getpid())
        .process(np.ascontiguousarray(rgb))
        .multi_face_landmarks
    )
    height, width = rgb.shape[:2]
    faces = []
    for face in found or []:
        xs, ys = [p.x for p in face.landmark], [p.y for p in face.landmark]
        if min((max(xs) - min(xs)) * width, (max(ys) - min(ys)) * height) >= min_face_size:
            faces.append(face)
    return faces

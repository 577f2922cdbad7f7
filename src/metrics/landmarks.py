"""Face-landmark controllability: detect landmarks on the generated face and on the ground-truth image
(not a fixed reference face: the official script has that bug) and report the mean per-point distance in
pixels of the evaluated image. Faces that are not found are counted, not scored.

Detection is `src.data.annotators.detect_faces`, the function that made the shards' landmark conditions
(MediaPipe FaceMesh with controlnet-aux's `MediapipeFaceDetector` settings), with the converter's defaults:
detection confidence 0.5, the image annotated at 512 px (shorter side), faces under 64 px ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from src.data.annotators import MIN_FACE_SIZE, detect_faces
from src.data.transforms import resize_shorter
from src.metrics.base import EvalSample, Scorer, mean


def landmark_error(predicted: np.ndarray, target: np.ndarray) -> float:
    """Mean Euclidean distance between corresponding points `[N, 2]` (pixels)."""
    if predicted.shape != target.shape:
        raise ValueError(f"landmark sets differ in shape: {predicted.shape} vs {target.shape}")
    return float(np.linalg.norm(predicted - target, axis=-1).mean())


class FaceLandmarker:
    """RGB uint8 image -> landmarks `[478, 2]` in its pixels (x, y) of the first face found, or None.

    Args:
        detect_resolution: the image's shorter side is resized to this before detection.
        min_confidence: MediaPipe's minimum face detection confidence.
        min_face_size: faces smaller than this (pixels at the detection resolution) are ignored.
    """

    def __init__(
        self, detect_resolution: int = 512, min_confidence: float = 0.5, min_face_size: int = MIN_FACE_SIZE
    ) -> None:
        if detect_resolution < 1 or not 0 <= min_confidence <= 1:
            raise ValueError(
                f"detect_resolution {detect_resolution} must be >= 1 and min_confidence "
                f"{min_confidence} in [0, 1]"
            )
        self.detect_resolution, self.min_confidence, self.min_face_size = (
            detect_resolution,
            min_confidence,
            min_face_size,
        )

    def __call__(self, rgb: np.ndarray) -> np.ndarray | None:
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"landmark detection expects an RGB uint8 image, got {rgb.dtype} {rgb.shape}")
        detect = np.ascontiguousarray(resize_shorter(rgb, self.detect_resolution))
        faces = detect_faces(detect, 1, self.min_confidence, self.min_face_size)
        if not faces:
            return None
        points = np.array([[p.x, p.y] for p in faces[0].landmark], dtype=np.float64)
        return points * (rgb.shape[1], rgb.shape[0])


class LandmarkScorer(Scorer):
    """Mean landmark error in pixels (`landmark_error_px`) over samples with a face in both images."""

    name, primary, higher_is_better = "landmarks", "landmark_error_px", False

    def __init__(self, landmarker: FaceLandmarker | None = None) -> None:
        self.landmarker = landmarker or FaceLandmarker()
        self.errors: list[float] = []
        self.no_face_target = self.no_face_generated = 0

    def score_batch(
        self, generated: Sequence[np.ndarray], samples: Sequence[EvalSample]
    ) -> list[dict[str, float]]:
        values = []
        for image, sample in zip(generated, samples, strict=True):
            truth = self.landmarker(sample.target)
            found = self.landmarker(image) if truth is not None else None
            self.no_face_target += truth is None
            self.no_face_generated += truth is not None and found is None
            if found is None:
                values.append({})
                continue
            self.errors.append(landmark_error(found, truth))
            values.append({"landmark_error_px": self.errors[-1]})
        return values

    def summary(self) -> dict[str, float]:
        with_face = len(self.errors) + self.no_face_generated
        return {
            "landmark_error_px": mean(self.errors),
            "landmark_detection_rate": len(self.errors) / with_face if with_face else float("nan"),
            "landmark_no_face_generated": float(self.no_face_generated),
            "landmark_no_face_target": float(self.no_face_target),
        }

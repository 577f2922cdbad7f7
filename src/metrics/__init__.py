"""Controllability and quality metrics of generated images (docs/design.md, "Metrics").

Pure maths (edge IoU/F1, mIoU from a confusion matrix, landmark distances) sits beside the scorers that
`src.evaluate` and the training callback run over samples: one scorer per metric, each with per-sample
values (for best/worst cases) and a dataset summary.
"""

from .base import EvalSample, Scorer
from .edges import CannyScorer, binary_iou_f1, canny_iou_f1
from .landmarks import FaceLandmarker, LandmarkScorer, landmark_error
from .segmentation import SegmentationScorer, Segmenter, confusion_matrix, mean_iou

__all__ = [
    "CannyScorer",
    "EvalSample",
    "FaceLandmarker",
    "LandmarkScorer",
    "Scorer",
    "SegmentationScorer",
    "Segmenter",
    "binary_iou_f1",
    "canny_iou_f1",
    "confusion_matrix",
    "landmark_error",
    "mean_iou",
]

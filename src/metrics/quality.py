"""Image quality through torchmetrics: FID (InceptionV3 features, or a custom feature extractor) and CLIP
score. Both need pretrained weights; when they are not available locally, building the scorer raises one
clear error (before anything is generated) instead of trying to download them mid-evaluation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from src.errors import MissingInputError
from src.metrics.base import EvalSample, Scorer


class QualityWeightsError(MissingInputError):
    """The weights a quality metric needs are not available locally."""


def _as_batch(images: Sequence[np.ndarray]) -> torch.Tensor:
    """RGB uint8 `[H, W, 3]` arrays -> uint8 tensor `[N, 3, H, W]`."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def build_fid(feature: int = 2048, extractor: nn.Module | None = None, weights_path: str | None = None):
    """torchmetrics `FrechetInceptionDistance` on InceptionV3 features (needs torch-fidelity and its weights,
    or `weights_path`), or on a custom `extractor` mapping uint8 images `[N, 3, H, W]` to features `[N, D]`."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if extractor is not None:
        return FrechetInceptionDistance(feature=extractor.eval(), reset_real_features=True)
    hint = (
        "or set fid.extractor to a custom feature extractor (an nn.Module mapping uint8 [N, 3, H, W] images "
        "to [N, D] features)"
    )
    if not _TORCH_FIDELITY_AVAILABLE:
        raise QualityWeightsError(
            f"FID with InceptionV3 features (fid.feature={feature}) needs torch-fidelity: "
            f"`pip install torch-fidelity` and give fid.weights_path or go online once, {hint}"
        )
    if weights_path is not None and not os.path.isfile(weights_path):
        raise QualityWeightsError(
            f"fid.weights_path '{weights_path}' is not a file: point it at torch-fidelity's "
            f"InceptionV3 weights (pt_inception-2015-12-05), {hint}"
        )
    try:
        return FrechetInceptionDistance(feature=feature, feature_extractor_weights_path=weights_path)
    except Exception as err:  # a failed weight download surfaces as any network or file error
        raise QualityWeightsError(
            f"FID InceptionV3 weights are not available ({type(err).__name__}: {err}): set "
            f"fid.weights_path to a local copy, {hint}"
        ) from None


def build_clip_score(model: str = "openai/clip-vit-large-patch14"):
    """torchmetrics `CLIPScore` with a CLIP model loaded by transformers from a local folder or the hub cache."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        clip = CLIPModel.from_pretrained(model, local_files_only=offline)
        processor = CLIPProcessor.from_pretrained(model, local_files_only=offline)
    except OSError as err:
        raise QualityWeightsError(
            f"CLIP score weights '{model}' are not available locally ({type(err).__name__}): set "
            "clip_score.model to a local folder holding a transformers CLIP model (e.g. a download of "
            "openai/clip-vit-large-patch14), or run once online to cache it"
        ) from None
    return CLIPScore(model_name_or_path=lambda: (clip.eval(), processor))


class FIDScorer(Scorer):
    """FID between the generated images and their ground-truth images (set-level; lower is better)."""

    name = "fid"

    def __init__(self, fid) -> None:
        self.fid, self.count = fid, 0

    def score_batch(
        self, generated: Sequence[np.ndarray], samples: Sequence[EvalSample]
    ) -> list[dict[str, float]]:
        self.fid.update(_as_batch([s.target for s in samples]), real=True)
        self.fid.update(_as_batch(generated), real=False)
        self.count += len(samples)
        return [{} for _ in samples]

    def summary(self) -> dict[str, float]:
        """FID needs at least two images per side; NaN below that."""
        return {"fid": float(self.fid.compute()) if self.count >= 2 else float("nan")}


class CLIPScorer(Scorer):
    """CLIP score of each generated image against its prompt, averaged (higher is better)."""

    name = "clip_score"

    def __init__(self, clip_score) -> None:
        self.clip_score, self.count = clip_score, 0

    def score_batch(
        self, generated: Sequence[np.ndarray], samples: Sequence[EvalSample]
    ) -> list[dict[str, float]]:
        self.clip_score.update(_as_batch(generated), [s.caption for s in samples])
        self.count += len(samples)
        return [{} for _ in samples]

    def summary(self) -> dict[str, float]:
        return {"clip_score": float(self.clip_score.compute()) if self.count else float("nan")}

"""Metric maths on known cases: edge IoU/F1, mIoU, landmark error on a real face, FID/CLIP availability."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from src.metrics import (
    CannyScorer,
    EvalSample,
    FaceLandmarker,
    LandmarkScorer,
    SegmentationScorer,
    Segmenter,
    binary_iou_f1,
    canny_iou_f1,
    confusion_matrix,
    mean_iou,
)
from src.metrics.quality import FIDScorer, QualityWeightsError, build_clip_score, build_fid
from src.metrics.segmentation import SegmenterNotFoundError


# --- canny IoU / F1 ---------------------------------------------------------------------------------------
def test_identical_edge_maps_score_one_and_disjoint_maps_zero():
    rng = np.random.default_rng(0)
    edges = (rng.random((32, 32)) < 0.2).astype(np.uint8) * 255
    assert binary_iou_f1(edges, edges) == (1.0, 1.0)
    assert binary_iou_f1(edges, 255 - edges) == (0.0, 0.0)
    assert binary_iou_f1(np.zeros((4, 4)), np.zeros((4, 4))) == (1.0, 1.0)  # nothing to find, nothing found


def test_hand_computed_edge_case():
    predicted, target = np.zeros((3, 3), np.uint8), np.zeros((3, 3), np.uint8)
    predicted[0, 0] = predicted[0, 1] = predicted[2, 2] = 255  # TP at (0, 0); FP at (0, 1), (2, 2)
    target[0, 0] = target[1, 1] = 255  # FN at (1, 1)
    iou, f1 = binary_iou_f1(predicted, target)
    assert iou == pytest.approx(1 / 4) and f1 == pytest.approx(2 / 5)  # 1/(1+2+1), 2/(2+2+1)


def test_canny_scores_of_a_photo_against_itself_and_a_blank_image():
    import skimage.data

    photo = np.ascontiguousarray(skimage.data.astronaut()[::4, ::4])
    assert canny_iou_f1(photo, photo) == (1.0, 1.0)
    scorer = CannyScorer()
    values = scorer.score_batch([photo, np.zeros_like(photo)], [EvalSample("a", "", photo)] * 2)
    assert values == [{"canny_iou": 1.0, "canny_f1": 1.0}, {"canny_iou": 0.0, "canny_f1": 0.0}]
    assert scorer.summary()["canny_f1"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="low=200, high=100"):
        CannyScorer(200, 100)


# --- segmentation mIoU ------------------------------------------------------------------------------------
def _label_pair() -> tuple[np.ndarray, np.ndarray]:
    """4x5 labels: class 1 on top, class 2 below, an ignored (0) last column predicted as class 3;
    two top pixels predicted as class 2."""
    target = np.array([[1, 1, 1, 1, 0]] * 2 + [[2, 2, 2, 2, 0]] * 2)
    predicted = target.copy()
    predicted[:, 4] = 3
    predicted[0, 0] = predicted[1, 3] = 2
    return predicted, target


def test_miou_of_a_synthetic_label_pair():
    predicted, target = _label_pair()
    # class 1: TP 6, FN 2 -> 6/8; class 2: TP 8, FP 2 -> 8/10; classes 0 and 3 never counted
    miou, per_class = mean_iou(confusion_matrix(predicted, target, 4, ignore_index=0))
    assert miou == pytest.approx((0.75 + 0.8) / 2)
    assert np.isnan(per_class[0]) and np.isnan(per_class[3])
    # without ignoring 0: class 0 (FN 4) and class 3 (FP 4) count with IoU 0
    assert mean_iou(confusion_matrix(predicted, target, 4, ignore_index=None))[0] == pytest.approx(1.55 / 4)
    assert mean_iou(confusion_matrix(target, target, 4, ignore_index=0))[0] == 1.0
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(predicted, target, 2, ignore_index=0)  # class 2 does not fit


def _tiny_segformer(folder) -> str:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    torch.manual_seed(0)
    config = SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 1],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        num_labels=5,
    )
    SegformerForSemanticSegmentation(config).save_pretrained(folder)
    SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


def test_segmenter_from_a_local_folder_feeds_the_miou_scorer(tmp_path):
    segmenter = Segmenter(_tiny_segformer(tmp_path / "segformer"), label_offset=1)
    images = [np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8) for i in range(2)]
    maps = segmenter(images)
    assert [m.shape for m in maps] == [(40, 48)] * 2
    assert all(m.min() >= 1 and m.max() <= 5 for m in maps)
    scorer = SegmentationScorer(segmenter, ignore_index=0)
    samples = [
        EvalSample(f"k{i}", "", img, labels=m) for i, (img, m) in enumerate(zip(images, maps, strict=True))
    ]
    assert scorer.score_batch(images, samples) == [{"seg_miou": 1.0}, {"seg_miou": 1.0}]  # its own prediction
    assert scorer.summary()["seg_miou"] == 1.0 and scorer.num_classes == 6


@pytest.mark.parametrize("model", ["/nonexistent/segformer", "nvidia/segformer-b4-finetuned-ade-512-512"])
def test_segmenter_without_local_weights_fails_in_one_clear_line(model):
    with pytest.raises(SegmenterNotFoundError) as err:
        Segmenter(model)
    assert model in str(err.value) and "segmenter.model" in str(err.value) and "\n" not in str(err.value)


# --- landmarks on scikit-image's face photo ---------------------------------------------------------------
@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    import skimage.data

    return np.ascontiguousarray(skimage.data.astronaut())


def _shift_right(image: np.ndarray, k: int) -> np.ndarray:
    shifted = np.zeros_like(image)
    shifted[:, k:] = image[:, :-k]
    return shifted


def test_landmark_error_is_zero_on_itself_and_about_k_for_a_k_pixel_shift(astronaut):
    scorer = LandmarkScorer(FaceLandmarker())
    target = EvalSample("astronaut", "", astronaut)
    shifted = {k: _shift_right(astronaut, k) for k in (8, 16)}
    values = scorer.score_batch([astronaut, shifted[8], shifted[16]], [target] * 3)
    assert values[0]["landmark_error_px"] == 0.0
    assert values[1]["landmark_error_px"] == pytest.approx(8, abs=1.0)
    assert values[2]["landmark_error_px"] == pytest.approx(16, abs=1.5)
    # no face in the generated image: counted, not scored; no face in the ground truth: counted apart
    assert scorer.score_batch([np.zeros_like(astronaut)], [target]) == [{}]
    assert scorer.score_batch([astronaut], [EvalSample("blank", "", np.zeros_like(astronaut))]) == [{}]
    summary = scorer.summary()
    assert summary["landmark_no_face_generated"] == 1 and summary["landmark_no_face_target"] == 1
    assert summary["landmark_detection_rate"] == pytest.approx(3 / 4)
    assert summary["landmark_error_px"] == pytest.approx(np.mean([v["landmark_error_px"] for v in values]))


@pytest.mark.filterwarnings("ignore:Overwriting .* in registry:UserWarning")
def test_the_metric_detects_with_the_converters_detector(astronaut):
    """The landmark metric finds the points the face converter stored, with controlnet-aux's face size limit."""
    from controlnet_aux.mediapipe_face import mediapipe_face_common

    from data_prep import faces
    from src.data import annotators

    assert mediapipe_face_common.min_face_size_pixels == annotators.MIN_FACE_SIZE
    assert faces.detect_faces is annotators.detect_faces
    _, _, stored = faces.annotate_landmarks(astronaut, faces.FaceOptions())
    np.testing.assert_allclose(FaceLandmarker()(astronaut), np.array(stored[0]), atol=0.01)


# --- quality metrics --------------------------------------------------------------------------------------
class ChannelStats(nn.Module):
    """A custom FID feature extractor: per-channel mean and standard deviation of uint8 images."""

    num_features = 6

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().flatten(2) / 255
        return torch.cat([x.mean(-1), x.std(-1)], dim=1)


def test_fid_with_a_custom_extractor_is_zero_for_identical_sets_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    real = [rng.integers(0, 200, (16, 16, 3), dtype=np.uint8) for _ in range(12)]
    samples = [EvalSample(str(i), "", image) for i, image in enumerate(real)]
    same = FIDScorer(build_fid(extractor=ChannelStats()))
    same.score_batch(real, samples)
    shifted = FIDScorer(build_fid(extractor=ChannelStats()))
    shifted.score_batch([image + 50 for image in real], samples)
    assert abs(same.summary()["fid"]) < 1e-4
    assert shifted.summary()["fid"] > 0.1


def test_quality_metrics_without_local_weights_fail_clearly():
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        with pytest.raises(QualityWeightsError, match="torch-fidelity.*fid.extractor"):
            build_fid(2048)
    with pytest.raises(QualityWeightsError, match="clip_score.model"):
        build_clip_score("openai/clip-vit-large-patch14")


def test_the_toy_judge_scorer_matches_validation_and_scores_a_target_against_itself_one(offline_cache):
    from helpers import demo_inputs

    from src.callbacks.controllability import per_condition_scores
    from src.metrics.base import EvalSample, to_uint8
    from src.metrics.segmentation import ToyJudgeScorer

    items = demo_inputs(4)
    targets = to_uint8(torch.stack([item.target for item in items]))
    samples = [
        EvalSample(item.key, "", target, target, None) for item, target in zip(items, targets, strict=True)
    ]
    scorer = ToyJudgeScorer()
    own = scorer.score_batch(targets, samples)
    assert [v["seg_miou"] for v in own] == [1.0] * 4  # every shape of a target found where it is
    shifted = [targets[(i + 1) % 4] for i in range(4)]  # each image scored against another scene
    values = [v["seg_miou"] for v in ToyJudgeScorer().score_batch(shifted, samples)]
    assert max(values) < 1.0
    assert values == pytest.approx(per_condition_scores(shifted, list(targets), "seg")["seg_miou"])
    assert scorer.summary() == {"seg_miou": 1.0}

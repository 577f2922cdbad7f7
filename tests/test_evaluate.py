"""Evaluation over validation shards: reports, a perfect generator scores 1, errors before weights load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import STEPS, compose_config
from omegaconf import OmegaConf

from src.evaluate import evaluate
from src.metrics.evaluation import CaseKeeper
from src.metrics.segmentation import SegmenterNotFoundError


def test_evaluation_writes_consistent_reports(trained_run, tmp_path):
    cfg = compose_config(
        f"run={trained_run}",
        "max_samples=5",
        f"sampling.num_inference_steps={STEPS}",
        "cases=2",
        name="evaluate",
        output_dir=tmp_path,
    )
    report = evaluate(cfg)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["metrics"] == report["metrics"] and saved["samples"] == 5 == len(saved["per_sample"])
    f1s = [s["canny_f1"] for s in saved["per_sample"]]
    assert all(0 <= v <= 1 for v in f1s)
    assert report["metrics"]["canny_f1"] == pytest.approx(sum(f1s) / len(f1s))
    assert report["metrics"]["canny_iou"] <= report["metrics"]["canny_f1"]  # IoU <= F1 for every image
    assert "| canny_f1 |" in (tmp_path / "metrics.md").read_text()
    from PIL import Image

    for name in ("best.png", "worst.png"):
        with Image.open(tmp_path / name) as grid:  # 2 rows of condition | generated | target
            assert grid.size == (3 * 64 + 4 * 2, 2 * 64 + 3 * 2)


def test_a_perfect_generator_scores_one(trained_run, tmp_path, monkeypatch):
    """Returning each sample's own target image must give canny IoU = F1 = 1: the wiring of conditions,
    generations and targets (order, scaling, crop) is right."""
    from src import evaluate as module

    targets: list[torch.Tensor] = []
    original = module.iter_shard_inputs

    def remember(*args, **kwargs):
        for item in original(*args, **kwargs):
            targets.append(item.target)
            yield item

    def oracle(model, conditions, prompts, options):
        batch = torch.stack(targets[-len(prompts) :])
        return batch[:, None]

    monkeypatch.setattr(module, "iter_shard_inputs", remember)
    monkeypatch.setattr(module, "generate_images", oracle)
    cfg = compose_config(
        f"run={trained_run}", "max_samples=6", "sampling.batch_size=4", name="evaluate", output_dir=tmp_path
    )
    metrics = evaluate(cfg)["metrics"]
    assert (metrics["canny_iou"], metrics["canny_f1"], metrics["canny_images"]) == (1.0, 1.0, 6)


def test_missing_segmenter_fails_before_the_model_loads(trained_run, tmp_path, monkeypatch):
    seg_run = tmp_path / "seg_run"
    shutil.copytree(trained_run, seg_run)
    config = OmegaConf.load(seg_run / "config.yaml")
    config.task.condition = "seg"
    OmegaConf.save(config, seg_run / "config.yaml")

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the segmenter")

    monkeypatch.setattr("src.evaluate.load_controlled", refuse)
    shards = str(Path(config.data.val_shards))
    cfg = compose_config(f"run={seg_run}", f"shards={shards}", name="evaluate", output_dir=tmp_path / "out")
    with pytest.raises(SegmenterNotFoundError, match="segformer-b4"):
        evaluate(cfg)
    cfg = compose_config(
        f"run={trained_run}", "fid.enabled=true", name="evaluate", output_dir=tmp_path / "out"
    )
    with pytest.raises(FileNotFoundError, match="fid"):
        evaluate(cfg)


def test_case_keeper_keeps_the_extremes():
    keeper = CaseKeeper(2, higher_is_better=False)  # e.g. landmark error: low is good
    for value in (5.0, 1.0, float("nan"), 3.0, 9.0, 2.0, None):
        keeper.add(value, str(value), torch.zeros(1))
    assert [key for _, key, _ in keeper.best()] == ["1.0", "2.0"]
    assert [key for _, key, _ in keeper.worst()] == ["9.0", "5.0"]

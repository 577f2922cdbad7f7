"""The training-time controllability callback: what it logs, when, and that every task config registers it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import compose_config
from hydra.utils import instantiate

from src.callbacks.controllability import ControllabilityMetric, chance_level

TASKS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "task").glob("*.yaml"))


class FakeModule:
    """Duck-typed LightningModule: `generate` returns what `make` gives, `log_dict` records."""

    def __init__(self, make) -> None:
        self.make, self.logged, self.calls = make, {}, []

    def generate(self, condition, prompts, **kwargs):
        self.calls.append(kwargs)
        return self.make(condition)

    def validation_samples(self, batch, max_images):
        n = min(max_images, len(batch["caption"]))
        return self.generate(batch["condition"][:n], batch["caption"][:n])

    def log_dict(self, values, **kwargs):
        self.logged.update(values)


def _batch() -> dict:
    import skimage.data

    photo = torch.from_numpy(skimage.data.astronaut()[::8, ::8].copy()).permute(2, 0, 1).float() / 255
    images = torch.stack([photo, photo.flip(-1), photo.flip(-2)])
    return {
        "image": images * 2 - 1,
        "condition": torch.rand(3, 3, 64, 64),
        "caption": ["a", "b", "c"],
        "key": ["k0", "k1", "k2"],
    }


def _run(callback, module, batches=1, sanity=False, batch=None):
    trainer = SimpleNamespace(sanity_checking=sanity)
    callback.on_validation_epoch_start(trainer, module)
    for batch_idx in range(batches):
        callback.on_validation_batch_end(trainer, module, None, batch or _batch(), batch_idx)
    callback.on_validation_epoch_end(trainer, module)


def test_canny_f1_is_one_for_the_targets_and_zero_for_blank_images():
    batch = _batch()
    perfect = FakeModule(lambda condition: (batch["image"][: len(condition)] + 1) / 2)
    _run(ControllabilityMetric("canny", max_images=2, num_inference_steps=3), perfect)
    assert perfect.logged["val/canny_f1"] == perfect.logged["val/canny_iou"] == 1.0
    assert (
        perfect.logged["val/canny_f1_chance"] < 0.5
    )  # the same images against each other's (flipped) targets
    assert perfect.calls == [{"num_inference_steps": 3}]
    blank = FakeModule(lambda condition: torch.zeros(len(condition), 3, 64, 64))
    _run(ControllabilityMetric("canny"), blank)
    assert blank.logged == {"val/canny_f1": 0.0, "val/canny_iou": 0.0, "val/canny_f1_chance": 0.0}
    assert blank.calls == [{}]


def test_images_are_collected_over_batches_up_to_max_images():
    module = FakeModule(lambda condition: torch.zeros(len(condition), 3, 64, 64))
    callback = ControllabilityMetric("canny", max_images=4)
    _run(callback, module, batches=3)
    assert len(module.calls) == 2  # 3 images from the first batch, 1 from the second, none from the third


def test_nothing_runs_in_the_sanity_check_or_without_a_metric():
    for callback, kwargs in [
        (ControllabilityMetric("canny"), {"sanity": True}),
        (ControllabilityMetric("seg"), {}),
    ]:
        module = FakeModule(lambda condition: torch.zeros(len(condition), 3, 64, 64))
        _run(callback, module, **kwargs)
        assert module.logged == {}
    with pytest.raises(ValueError, match="unknown condition 'edges'"):
        ControllabilityMetric("edges")


def _toy_batch(count: int = 6) -> dict:
    from src.toy.world import render, scene_at

    scenes = [scene_at(3, i) for i in range(count)]
    images = torch.stack([torch.from_numpy(render(s, 64)[0]).permute(2, 0, 1).float() / 255 for s in scenes])
    return {
        "image": images * 2 - 1,
        "condition": torch.rand(count, 3, 64, 64),
        "caption": [s.caption for s in scenes],
        "key": [f"k{i}" for i in range(count)],
    }


def test_toy_captions_add_caption_fidelity_and_segmentation_miou_above_chance():
    batch = _toy_batch()
    module = FakeModule(lambda condition: (batch["image"][: len(condition)] + 1) / 2)
    _run(ControllabilityMetric("seg"), module, batch=batch)
    logged = module.logged
    assert logged["val/caption_colour_acc"] == logged["val/caption_shape_acc"] == 1.0
    assert logged["val/seg_miou"] > 0.9 and logged["val/seg_miou_chance"] < 0.5
    flipped = FakeModule(lambda condition: (batch["image"][: len(condition)].flip(-1) + 1) / 2)
    _run(ControllabilityMetric("seg"), flipped, batch=batch)
    assert flipped.logged["val/seg_miou"] < logged["val/seg_miou"]


@pytest.mark.parametrize("task", TASKS)
def test_every_task_registers_the_callback_with_its_condition(task):
    cfg = compose_config(f"task={task}")
    callback = instantiate(cfg.callbacks.controllability)
    assert isinstance(callback, ControllabilityMetric) and callback.condition == cfg.task.condition


@pytest.mark.slow
def test_a_short_training_run_logs_canny_f1_beside_the_loss(tmp_path):
    from src.train import train

    out = tmp_path / "run"
    metrics = train(compose_config("debug=default", output_dir=out))
    assert 0.0 <= metrics["val/canny_f1"] <= 1.0 and "val/loss" in metrics
    header = (out / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/canny_f1", "val/canny_iou", "val/loss"} <= set(header)


def test_chance_level_pairs_every_image_with_every_other_target_once():
    # a score that is the mean of a pairwise table over (image i, target at position i): the chance level must
    # be the mean of the table's off-diagonal, computed here independently
    table = torch.rand(6, 6, generator=torch.Generator().manual_seed(0))

    def score(targets):
        return float(torch.stack([table[i, t] for i, t in enumerate(targets)]).mean())

    off_diagonal = table[~torch.eye(6, dtype=torch.bool)].mean()
    assert chance_level(score, list(range(6))) == pytest.approx(float(off_diagonal), abs=1e-6)
    assert chance_level(score, list(range(6))) != pytest.approx(score(list(range(6))), abs=1e-3)

"""The training-time controllability callback: what it logs, when, and that every task config registers it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import compose_config
from hydra.utils import instantiate

from src.callbacks.controllability import ControllabilityMetric

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
    return {"image": images * 2 - 1, "condition": torch.rand(3, 3, 64, 64), "caption": ["a", "b", "c"],
            "key": ["k0", "k1", "k2"]}


def _run(callback, module, batch_idx=0, sanity=False):
    trainer = SimpleNamespace(sanity_checking=sanity)
    callback.on_validation_batch_end(trainer, module, None, _batch(), batch_idx)


def test_canny_f1_is_one_for_the_targets_and_zero_for_blank_images():
    batch = _batch()
    perfect = FakeModule(lambda condition: (batch["image"][: len(condition)] + 1) / 2)
    _run(ControllabilityMetric("canny", max_images=2, num_inference_steps=3), perfect)
    assert perfect.logged == {"val/canny_f1": 1.0, "val/canny_iou": 1.0}
    assert perfect.calls == [{"num_inference_steps": 3}]
    blank = FakeModule(lambda condition: torch.zeros(len(condition), 3, 64, 64))
    _run(ControllabilityMetric("canny"), blank)
    assert blank.logged == {"val/canny_f1": 0.0, "val/canny_iou": 0.0} and blank.calls == [{}]


def test_nothing_runs_outside_the_first_real_validation_batch_or_without_a_cheap_metric():
    for callback, kwargs in [(ControllabilityMetric("canny"), {"batch_idx": 1}),
                             (ControllabilityMetric("canny"), {"sanity": True}),
                             (ControllabilityMetric("seg"), {})]:
        module = FakeModule(lambda condition: pytest.fail("generated"))
        _run(callback, module, **kwargs)
        assert module.logged == {}
    with pytest.raises(ValueError, match="unknown condition 'edges'"):
        ControllabilityMetric("edges")


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

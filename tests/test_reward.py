"""The consistency reward (`module.consistency`, src/models/reward.py): its edge operator against OpenCV, its
Dice against the F1 of the metric, the one-step clean estimate, the refusals, and gradients in training."""

from __future__ import annotations

import functools

import cv2
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from helpers import compose_config
from hydra.utils import instantiate

from src.data.annotators import canny_edges
from src.errors import ConfigError
from src.metrics.edges import binary_iou_f1
from src.models.module import OFTControlModule
from src.models.reward import ConsistencyReward, clean_estimate, sobel_magnitude, soft_dice_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _shapes(seed: int = 0, size: int = 32) -> np.ndarray:
    """An RGB uint8 image of a few flat rectangles and a disc on a light background."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), 230, np.uint8)
    for _ in range(3):
        x, y = rng.integers(0, size - 8, 2)
        w, h = rng.integers(4, 12, 2)
        image[y : y + h, x : x + w] = rng.integers(0, 200, 3)
    cv2.circle(image, (size // 2, size // 2), size // 5, tuple(int(c) for c in rng.integers(0, 200, 3)), -1)
    return image


def _tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1


def test_sobel_magnitude_equals_opencv():
    image = _shapes()
    grey = cv2.cvtColor(image.astype(np.float32), cv2.COLOR_RGB2GRAY)
    gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3)
    ours = sobel_magnitude(_tensor(image))[0].numpy()
    np.testing.assert_allclose(ours, np.abs(gx) + np.abs(gy), atol=2e-3)


def test_hard_limit_of_the_soft_edges_holds_every_canny_edge():
    """Canny keeps a subset of the pixels whose L1 gradient exceeds its low threshold: with a sharp sigmoid at
    that threshold, the soft edges cover every canny edge pixel."""
    image = _shapes(1)
    soft = torch.sigmoid((sobel_magnitude(_tensor(image)) - 99.5) / 1e-3)[0].numpy()
    edges = canny_edges(image) > 0
    assert edges.any() and (soft[edges] > 0.99).all()


def test_soft_dice_on_binary_maps_is_one_minus_the_metrics_f1():
    rng = np.random.default_rng(2)
    predicted, target = rng.random((2, 4, 16, 16)) > 0.8
    f1 = np.mean([binary_iou_f1(p, t)[1] for p, t in zip(predicted, target, strict=True)])
    dice = soft_dice_loss(torch.from_numpy(predicted).float(), torch.from_numpy(target).float(), smooth=0.0)
    assert float(dice) == pytest.approx(1 - f1, abs=1e-6)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_clean_estimate_recovers_the_latents_from_the_true_target(kind):
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=kind)
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 150, 999])
    noisy = scheduler.add_noise(latents, noise, t)
    target = noise if kind == "epsilon" else scheduler.get_velocity(latents, noise, t)
    estimate = clean_estimate(scheduler, noisy, target, t)
    torch.testing.assert_close(estimate[:2], latents[:2], atol=1e-4, rtol=1e-4)  # t=999: 1/sqrt(alpha) ~ 200
    torch.testing.assert_close(estimate[2], latents[2], atol=5e-2, rtol=0)


def test_descending_the_reward_draws_the_conditions_edges():
    """An image optimised on the reward alone, from faint noise, gets canny edges (the metric's, hard) that
    match the condition: F1 from under 0.1 to over 0.5."""
    image = _shapes(3)
    target = torch.from_numpy(canny_edges(image) > 0).float()[None]

    def f1(x: torch.Tensor) -> float:
        drawn = ((x.detach()[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
        return binary_iou_f1(canny_edges(drawn), target[0].numpy())[1]

    x = (torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.2 - 0.1).requires_grad_(
        True
    )
    before = f1(x)
    reward = ConsistencyReward(weight=1.0)
    optimizer = torch.optim.Adam([x], lr=0.02)
    for _ in range(300):
        optimizer.zero_grad()
        reward.loss(x, target).backward()
        optimizer.step()
    assert before < 0.1 and f1(x) > 0.5, (before, f1(x))


@pytest.mark.parametrize(
    ("value", "named"),
    [
        (dict(weight=-1.0), "module.consistency.weight -1.0"),
        (dict(fraction=0.0), "module.consistency.fraction 0.0"),
        (dict(max_timestep=0), "module.consistency.max_timestep 0"),
        (dict(softness=0.0), "module.consistency.softness 0.0"),
    ],
)
def test_bad_settings_are_refused_by_name(value, named):
    with pytest.raises(ConfigError, match=named):
        ConsistencyReward(**value)


def test_other_conditions_and_a_timestep_beyond_the_schedule_are_refused():
    with pytest.raises(ConfigError, match="task.condition is 'seg': set module.consistency.weight=0"):
        ConsistencyReward(weight=0.5).check("seg", 1000)
    with pytest.raises(ConfigError, match="max_timestep 2000 exceeds the scheduler's 1000"):
        ConsistencyReward(weight=0.5, max_timestep=2000).check("canny", 1000)
    ConsistencyReward().check("seg", 1000)  # off: any task


def _module(**reward) -> OFTControlModule:
    cfg = compose_config()
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3)
    return OFTControlModule(
        instantiate(cfg.model),
        instantiate(cfg.oft, _convert_="all"),
        optimizer,
        condition="canny",
        consistency=ConsistencyReward(**reward),
    )


def test_reward_reaches_every_trained_tensor_and_rewards_low_noise_samples_only():
    module = _module(weight=1.0, fraction=0.5, max_timestep=50)
    g = torch.Generator().manual_seed(0)
    edges = (torch.rand(4, 1, 64, 64, generator=g) > 0.9).float().expand(4, 3, 64, 64)
    batch = {"image": torch.rand(4, 3, 64, 64, generator=g) * 2 - 1, "condition": edges, "caption": ["a"] * 4}
    seen = {}
    predict = module.predict

    def spy(batch, noise, timesteps, captions, strength):
        seen["t"] = timesteps.clone()
        return predict(batch, noise, timesteps, captions, strength)

    module.predict = spy
    with torch.no_grad():  # away from the zero-initialised output, so every trained tensor has a say
        for p in module.trainable_parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    diffusion, consistency = module.rewarded_loss(batch, batch["caption"], 1.0)
    assert (seen["t"][:2] < 50).all() and torch.isfinite(diffusion)
    consistency.backward()
    silent = [
        n for n, p in module.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    assert not silent, silent[:5]


def test_train_refuses_the_reward_for_segmentation_before_weights_or_data_load(config_factory, monkeypatch):
    from src.train import train

    def refuse(*args, **kwargs):
        raise AssertionError("weights or data were loaded before the error was found")

    monkeypatch.setattr("src.models.module.load_backbone", refuse)
    monkeypatch.setattr("src.data.datamodule.ShardDataModule.prepare_data", refuse)
    cfg = config_factory("task=segmentation", "module.consistency.weight=0.5")
    with pytest.raises(ConfigError, match="rewards canny edges, but task.condition is 'seg'"):
        train(cfg)

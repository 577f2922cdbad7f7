"""A consistency reward for canny control, an optional loss term in the style of ControlNet++ (Li et al., ECCV
2024): the edges of the one-step image estimate should be the condition's edges.

For a part of each training batch (`fraction`) the timestep is redrawn among the low-noise ones
(`t < max_timestep`, where the one-step estimate of the clean image is already sharp). From the same UNet
prediction the diffusion loss uses, the clean latent is estimated (epsilon or v parameterisation), decoded by
the frozen VAE and passed through a differentiable edge operator: Canny's first stage (grey level, 3x3 Sobel,
the L1 magnitude ``|gx| + |gy|`` on the 0..255 scale) followed by a soft threshold (a sigmoid centred on
``threshold``, default the midpoint of the paper's Canny thresholds 100 and 200, of width ``softness``). The
loss is one minus the soft Dice coefficient (a differentiable F1) of these edges against the condition's
edge map, added to the diffusion loss times ``weight``. No UNet pass is added: the extra cost is one VAE
decode of the redrawn samples and its backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from src.errors import ConfigError

#: ITU-R BT.601 luma, as ``cv2.cvtColor(..., COLOR_RGB2GRAY)``
GREY = (0.299, 0.587, 0.114)
SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
#: the conditions the reward has an edge operator for
REWARDED = ("canny",)


@dataclass(frozen=True)
class ConsistencyReward:
    """`module.consistency`: off while ``weight`` is 0 (the default)."""

    weight: float = 0.0
    max_timestep: int = 200
    fraction: float = 0.25
    threshold: float = 150.0
    softness: float = 25.0

    def __post_init__(self) -> None:
        checks = (
            ("weight", self.weight >= 0, "a weight >= 0 (0: off)"),
            ("max_timestep", self.max_timestep >= 1, "a timestep >= 1 (ControlNet++ rewards t < 200)"),
            ("fraction", 0 < self.fraction <= 1, "the part of each batch rewarded, in (0, 1]"),
            ("softness", self.softness > 0, "the soft threshold's width, > 0"),
        )
        for key, ok, fix in checks:
            if not ok:
                raise ConfigError(f"module.consistency.{key} {getattr(self, key)} is invalid: set {fix}")

    @property
    def enabled(self) -> bool:
        return self.weight > 0

    def check(self, condition: str | None, num_train_timesteps: int | None = None) -> None:
        """Refuse a condition without an edge operator, and a low-noise range beyond the schedule (when known)."""
        if not self.enabled:
            return
        if condition not in REWARDED:
            raise ConfigError(
                f"module.consistency.weight {self.weight} rewards canny edges, but task.condition is "
                f"'{condition}': set module.consistency.weight=0 for this task"
            )
        if num_train_timesteps is not None and self.max_timestep > num_train_timesteps:
            raise ConfigError(
                f"module.consistency.max_timestep {self.max_timestep} exceeds the scheduler's "
                f"{num_train_timesteps} training timesteps: set it to at most {num_train_timesteps}"
            )

    def rewarded(self, count: int) -> int:
        """How many samples of a batch of ``count`` get a low-noise timestep and the reward (at least one)."""
        return max(1, min(count, round(self.fraction * count)))

    def loss(self, images: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        """``1 - soft Dice`` of the soft edges of ``images`` (RGB in [-1, 1]) against ``edges`` ([B, H, W] in
        [0, 1]), averaged over the batch."""
        soft = torch.sigmoid((sobel_magnitude(images) - self.threshold) / self.softness)
        return soft_dice_loss(soft, edges)


def sobel_magnitude(images: torch.Tensor) -> torch.Tensor:
    """``|gx| + |gy|`` of the grey level of RGB ``images`` in [-1, 1] on the 0..255 scale, 3x3 Sobel with the
    border reflected (OpenCV's default, BORDER_REFLECT_101): ``[B, H, W]``."""
    grey = torch.tensor(GREY, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    level = ((images.clamp(-1, 1) + 1) * 127.5 * grey).sum(dim=1, keepdim=True)
    level = F.pad(level, (1, 1, 1, 1), mode="reflect")
    kx = torch.tensor(SOBEL_X, dtype=images.dtype, device=images.device)
    kernels = torch.stack([kx, kx.t()]).unsqueeze(1)
    gradients = F.conv2d(level, kernels)
    return gradients.abs().sum(dim=1)


def soft_dice_loss(predicted: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)`` per image, averaged (F1 on soft maps)."""
    dims = tuple(range(1, predicted.dim()))
    overlap = (predicted * target).sum(dim=dims)
    total = predicted.sum(dim=dims) + target.sum(dim=dims)
    return (1 - (2 * overlap + smooth) / (total + smooth)).mean()


def clean_estimate(scheduler, noisy: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor):
    """The one-step estimate of the clean latent from a UNet prediction (epsilon or v) at ``timesteps``."""
    alphas = scheduler.alphas_cumprod.to(noisy.device, noisy.dtype)[timesteps].view(-1, 1, 1, 1)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (noisy - (1 - alphas).sqrt() * prediction) / alphas.sqrt()
    if kind == "v_prediction":
        return alphas.sqrt() * noisy - (1 - alphas).sqrt() * prediction
    raise ConfigError(f"prediction_type '{kind}' is not supported; use epsilon or v_prediction")

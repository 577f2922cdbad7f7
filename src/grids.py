"""Image grids: one row per sample, columns side by side (sample grids, generation and evaluation)."""

from __future__ import annotations

import torch


def image_grid(*columns: torch.Tensor) -> torch.Tensor:
    """`[3, H', W']` grid in [0, 1] with 2-pixel white padding, one row per sample.

    Each column is `[N, 3, H, W]` (one tile per row) or `[N, K, 3, H, W]` (K tiles per row), e.g.
    `image_grid(condition, generated, target)` or `image_grid(conditions, samples)`.
    """
    from torchvision.utils import make_grid

    tiles = torch.cat([c.float().cpu()[:, None] if c.dim() == 4 else c.float().cpu() for c in columns], dim=1)
    return make_grid(tiles.flatten(0, 1).clamp(0, 1), nrow=tiles.shape[1], padding=2, pad_value=1.0)


def condition_columns(conditions: torch.Tensor) -> list[torch.Tensor]:
    """`[N, 3k, H, W]` conditions side by side (several conditions, `src.models.multi`) -> k `[N, 3, H, W]`
    grid columns; one condition stays one column."""
    return list(conditions.split(3, dim=-3))

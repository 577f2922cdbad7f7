"""Hyperspherical energy of a layer's neurons (Liu et al. 2018; OFT preserves it, Qiu et al. 2023)."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def hyperspherical_energy(
    weight: Tensor, chunk_size: int = 2048, dtype: torch.dtype = torch.float64
) -> Tensor:
    """``HE(W) = sum_{i != j} 1 / ||w^_i - w^_j||`` with ``w^ = w / ||w||`` over the rows of ``W`` viewed
    ``[out, -1]`` (ordered pairs, so each unordered pair counts twice).

    Uses ``||w^_i - w^_j||^2 = 2 - 2 <w^_i, w^_j>``: HE depends only on the Gram matrix of the unit
    neurons, which ``W -> W R`` with orthogonal ``R`` leaves unchanged. Computed in ``dtype`` in row
    chunks of ``chunk_size`` (memory ``chunk_size * out``). Coincident neurons give ``inf``.
    """
    rows = weight.detach().reshape(weight.shape[0], -1).to(dtype)
    unit = rows / rows.norm(dim=1, keepdim=True)
    total = torch.zeros((), dtype=dtype, device=weight.device)
    for start in range(0, unit.shape[0], chunk_size):
        gram = unit[start : start + chunk_size] @ unit.t()
        dist = (2.0 - 2.0 * gram).clamp_min(0.0).sqrt()
        idx = torch.arange(gram.shape[0], device=weight.device)
        dist[idx, idx + start] = float("inf")  # drop i == j
        total += dist.reciprocal().sum()
    return total

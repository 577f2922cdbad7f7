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
    Cost ``out^2 * in``: see :func:`hyperspherical_energy_estimate` for large layers.
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


def neuron_subset(n_neurons: int, size: int, generator: torch.Generator | None = None) -> Tensor:
    """A uniform random subset of ``min(size, n_neurons)`` of the indices ``0..n_neurons-1``, sorted."""
    if size < 2:
        raise ValueError(f"a neuron subset needs at least 2 neurons to have a pair, got size {size}")
    if size >= n_neurons:
        return torch.arange(n_neurons)
    return torch.randperm(n_neurons, generator=generator)[:size].sort().values


def pair_scale(n_neurons: int, size: int) -> float:
    """``N(N-1) / (m(m-1))``: the inverse probability that an ordered pair of neurons lies in the subset."""
    size = min(size, n_neurons)
    return n_neurons * (n_neurons - 1) / (size * (size - 1))


@torch.no_grad()
def hyperspherical_energy_estimate(
    weight: Tensor, neurons: Tensor, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Unbiased estimate of :func:`hyperspherical_energy` from a uniform random subset ``S`` of neurons.

    ``HE^(W) = N(N-1) / (m(m-1)) * HE(W[S])`` with ``N`` neurons and ``m = |S|`` (from
    :func:`neuron_subset`): each ordered pair ``(i, j)`` lies in ``S`` with probability
    ``m(m-1) / (N(N-1))``, so ``E[HE^] = HE`` (exact when ``S`` holds every neuron). Cost ``m^2 * in``
    instead of ``N^2 * in``. With a fixed ``S``, ``HE(W[S] R) = HE(W[S])`` for orthogonal ``R``, so the
    drift of the subset's energy under OFT is as exact a check as the full one.
    """
    rows = weight.detach().reshape(weight.shape[0], -1)
    subset = rows[neurons.to(rows.device)]
    return hyperspherical_energy(subset, dtype=dtype) * pair_scale(rows.shape[0], len(neurons))

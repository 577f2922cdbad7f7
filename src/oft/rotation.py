"""Pure tensor maths of OFT: skew-symmetric blocks, the Cayley map (exact and Neumann), COFT.

Shapes: ``params`` is ``[n, b(b-1)/2]`` (the free entries of ``n`` skew blocks), ``Q`` and ``R`` are
``[n, b, b]``. Orientation, used by both Cayley forms: ``R = (I + Q)(I - Q)^-1`` and the adapted weight is
``W' = W R`` (so ``y = W (R x)``). The free entries are the strict upper triangle of ``Q`` in row-major
order (``torch.triu_indices``), the lower triangle is their negation: the same layout as peft's OFT.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from src.errors import ConfigError


def n_skew_params(block_size: int) -> int:
    """Free entries of a ``b x b`` skew-symmetric matrix: ``b(b-1)/2``."""
    return block_size * (block_size - 1) // 2


@functools.lru_cache(maxsize=64)
def _triu(block_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    rows, cols = torch.triu_indices(block_size, block_size, offset=1, device=device)
    return rows, cols


def skew_from_params(params: Tensor, block_size: int) -> Tensor:
    """``Q = U - U^T`` where ``U`` holds ``params`` in its strict upper triangle: ``[n, m] -> [n, b, b]``."""
    if params.shape[-1] != n_skew_params(block_size):
        raise ValueError(
            f"params last dim {params.shape[-1]} != b(b-1)/2 = {n_skew_params(block_size)} for b={block_size}"
        )
    rows, cols = _triu(block_size, params.device)
    upper = _put_upper(params.new_zeros(params.shape[0], block_size, block_size), rows, cols, params)
    return upper - upper.transpose(-1, -2)


def _put_upper(upper: Tensor, rows: Tensor, cols: Tensor, params: Tensor) -> Tensor:
    """Out-of-place scatter of ``params`` into ``upper[:, rows, cols]`` (autograd-friendly)."""
    flat_index = (rows * upper.shape[-1] + cols).expand(params.shape[0], -1)
    return upper.flatten(1).scatter(1, flat_index, params).view_as(upper)


def params_from_skew(skew: Tensor) -> Tensor:
    """Inverse of :func:`skew_from_params`: the strict upper triangle, ``[n, b, b] -> [n, b(b-1)/2]``."""
    rows, cols = _triu(skew.shape[-1], skew.device)
    return skew[:, rows, cols]


class _CayleyExact(torch.autograd.Function):
    """``R = (I + Q)(I - Q)^-1 = 2 (I - Q)^-1 - I`` with ``(I - Q)^-1 = (I - Q^2)^-1 (I + Q)``.

    ``I - Q^2 = (I - Q)(I + Q) = I + Q^T Q`` is symmetric positive definite for skew ``Q`` (eigenvalues
    ``1 + lambda^2 >= 1``), so a batched Cholesky factorisation and inverse (``potrf``, ``potri``) and one
    product give ``R`` exactly: no LU with pivoting, whose batched MKL kernel hangs or returns garbage
    after ``torch.set_num_threads(n > 1)`` for blocks of about 159 and larger (torch 2.14, "SLASWP"
    errors). ``cholesky_inverse`` plus a GEMM is also about 1.5x faster than ``cholesky_solve`` with
    ``b`` right-hand sides on CPU (its triangular solves are slow), and both beat the LU solve.

    Backward without a solve: with ``X = (I - Q)^-1``, ``dR = 2 X dQ X`` and ``X = (R + I) / 2``, so
    ``dL/dQ = 2 X^T G X^T = (R^T + I) G (R^T + I) / 2`` for ``G = dL/dR``.
    """

    @staticmethod
    def forward(ctx: Any, skew: Tensor) -> Tensor:
        with torch.autocast(skew.device.type, enabled=False):
            eye = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device)
            inverse = torch.cholesky_inverse(torch.linalg.cholesky(eye - skew @ skew))  # (I - Q^2)^-1
            rotation = torch.baddbmm(eye, eye + skew, inverse, beta=-1.0, alpha=2.0)
        ctx.save_for_backward(rotation)
        return rotation

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (rotation,) = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            eye = torch.eye(rotation.shape[-1], dtype=rotation.dtype, device=rotation.device)
            half = rotation.mT + eye
            return 0.5 * (half @ grad.to(rotation.dtype) @ half)


def cayley_exact(skew: Tensor) -> Tensor:
    """Cayley transform ``R = (I + Q)(I - Q)^-1``, batched over blocks ``[n, b, b]``.

    Computed through the SPD matrix ``I - Q^2`` (Cholesky), see :class:`_CayleyExact`; exact to float
    precision for any skew ``Q`` (``I - Q`` is always invertible: its eigenvalues are ``1 - i*lambda``).
    """
    return _CayleyExact.apply(skew)


def solve_transposed(rotation: Tensor, rhs: Tensor) -> Tensor:
    """``R^-T M`` for invertible blocks ``R`` as ``(R R^T)^-1 R M`` (``R R^T`` is SPD): a Cholesky solve.

    Used where ``R`` need not be orthogonal (Cayley-Neumann); avoids the batched LU solve that hangs
    with several threads (see :class:`_CayleyExact`). ``R`` is near-orthogonal, so ``R R^T`` is as well
    conditioned as ``R``.
    """
    factor = torch.linalg.cholesky(rotation @ rotation.mT)
    return torch.cholesky_solve(rotation @ rhs, factor)


def cayley_neumann(skew: Tensor, terms: int) -> Tensor:
    """Cayley-Neumann form (OFTv2): ``R = (I + Q)(I + Q + Q^2 + ... + Q^(terms-1))``.

    The series truncates ``(I - Q)^-1``, so this approximates :func:`cayley_exact` in the same
    orientation. Exactly, ``R = C (I - Q^k)`` with ``C`` the exact Cayley matrix and ``k = terms``, hence
    ``R^T R - I = -(Q^k + (-Q)^k) + (-1)^k Q^(2k)``: see :func:`neumann_orthogonality_bound`.
    """
    eye = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device).expand_as(skew)
    series, power = eye, eye
    for _ in range(terms - 1):
        power = power @ skew
        series = series + power
    return series + skew @ series


def neumann_orthogonality_bound(spectral_norm: float, terms: int) -> float:
    """Bound on ``||R^T R - I||_2`` for :func:`cayley_neumann` with ``rho = ||Q||_2`` and ``k`` terms.

    ``Q`` is normal with eigenvalues ``+-i*lambda``, so the error's eigenvalues are
    ``-(i l)^k - (-i l)^k + (-1)^k (i l)^(2k)``: at most ``rho^(2k)`` for odd ``k`` and
    ``2 rho^k + rho^(2k)`` for even ``k``. ``||Q||_F`` may be used for ``rho`` (it is larger).
    """
    rho = float(spectral_norm)
    return rho ** (2 * terms) if terms % 2 else 2 * rho**terms + rho ** (2 * terms)


def cayley(skew: Tensor, method: str = "exact", terms: int = 5) -> Tensor:
    """Dispatch to :func:`cayley_exact` or :func:`cayley_neumann`."""
    if method == "exact":
        return cayley_exact(skew)
    if method == "neumann":
        return cayley_neumann(skew, terms)
    raise ConfigError(f"unknown Cayley method {method!r}; use 'exact' or 'neumann'")


def skew_frobenius_norm(params: Tensor) -> Tensor:
    """``||Q||_F`` of each block from its free entries: ``sqrt(2) * ||params||_2``, shape ``[n]``."""
    return math.sqrt(2.0) * params.norm(dim=-1)


@torch.no_grad()
def project_skew_params_(params: Tensor, radius: float) -> Tensor:
    """COFT projection, in place: ``Q <- Q * min(1, radius / ||Q||_F)`` for each block.

    This is the Euclidean projection onto the ball ``||Q||_F <= radius`` around ``Q = 0`` (``R = I``),
    the constraint of constrained OFT (Qiu et al. 2023, Sec. 3.3). Returns ``params``.
    """
    norms = skew_frobenius_norm(params)
    scale = torch.clamp(radius / norms.clamp_min(torch.finfo(params.dtype).tiny), max=1.0)
    return params.mul_(scale.unsqueeze(-1))


def rotate_weight(weight2d: Tensor, rotation: Tensor) -> Tensor:
    """``W R`` for ``W: [out, n*b]`` and block-diagonal ``R`` given as blocks ``[n, b, b]``.

    Computed blockwise, ``(W R)[:, k-th block] = W[:, k-th block] @ R_k`` (cost ``out * in * b``);
    no dense ``[in, in]`` matrix is formed.
    """
    n, b, _ = rotation.shape
    blocks = weight2d.reshape(weight2d.shape[0], n, b).transpose(0, 1)  # [n, out, b]
    return torch.bmm(blocks, rotation).transpose(0, 1).reshape(weight2d.shape)

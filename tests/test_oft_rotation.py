"""Rotation maths: skew layout, Cayley orientation and orthogonality, Neumann error bound, COFT."""

import pytest
import torch

from src.oft import (
    cayley_exact,
    cayley_neumann,
    neumann_orthogonality_bound,
    params_from_skew,
    skew_from_params,
)
from src.oft.rotation import n_skew_params, project_skew_params_, rotate_weight, skew_frobenius_norm


def _random_skew(n: int, b: int, rho: float, seed: int = 0) -> torch.Tensor:
    """``n`` random skew blocks with spectral norm exactly ``rho``."""
    gen = torch.Generator().manual_seed(seed)
    q = skew_from_params(torch.randn(n, n_skew_params(b), generator=gen, dtype=torch.float64), b)
    return q * (rho / torch.linalg.matrix_norm(q, ord=2))[:, None, None]


def test_skew_layout_roundtrip_and_upper_triangle():
    params = torch.arange(1.0, 7.0, dtype=torch.float64).unsqueeze(0)  # b = 4
    q = skew_from_params(params, 4)[0]
    assert torch.equal(q, -q.T)
    assert torch.equal(q[0, 1:], params[0, :3]) and q[1, 2] == 4 and q[2, 3] == 6  # row-major triu
    assert torch.equal(params_from_skew(q.unsqueeze(0)), params)


@pytest.mark.parametrize("b", [2, 7, 32])
def test_exact_cayley_is_orthogonal_and_matches_dense_inverse(b):
    q = _random_skew(3, b, rho=3.0)
    r = cayley_exact(q)
    eye = torch.eye(b, dtype=torch.float64)
    assert (r.mT @ r - eye).abs().max() < 1e-10
    dense = torch.stack([(eye + qk) @ torch.linalg.inv(eye - qk) for qk in q])
    assert (r - dense).abs().max() < 1e-10


@pytest.mark.parametrize("terms", [1, 2, 5, 6])
def test_neumann_orientation_and_error_bound(terms):
    """``R_neumann = C (I - Q^k)``: its distance to the exact ``C`` is ``rho^k`` (a transposed form would
    be ``O(rho)`` away), and ``||R^T R - I||_2`` obeys the documented bound (equality for odd ``k``)."""
    rho = 0.4
    q = _random_skew(4, 12, rho=rho, seed=terms)
    exact, approx = cayley_exact(q), cayley_neumann(q, terms)
    dist = torch.linalg.matrix_norm(approx - exact, ord=2)
    assert torch.allclose(dist, torch.full_like(dist, rho**terms), rtol=1e-8)
    err = torch.linalg.matrix_norm(approx.mT @ approx - torch.eye(12, dtype=q.dtype), ord=2)
    bound = neumann_orthogonality_bound(rho, terms)
    assert (err <= bound * (1 + 1e-9)).all()
    if terms % 2:
        assert torch.allclose(err, torch.full_like(err, bound), rtol=1e-8)


def test_neumann_converges_to_exact():
    q = _random_skew(2, 8, rho=0.5)
    assert (cayley_neumann(q, 60) - cayley_exact(q)).abs().max() < 1e-14


def test_coft_projection_clips_only_outside_blocks():
    params = torch.randn(5, n_skew_params(6), dtype=torch.float64)
    params[0] *= 1e-4  # inside the ball: unchanged
    before = params.clone()
    radius = 0.5
    project_skew_params_(params, radius)
    norms = skew_frobenius_norm(params)
    assert torch.equal(params[0], before[0])
    assert torch.allclose(norms[1:], torch.full((4,), radius, dtype=torch.float64))
    q = skew_from_params(params, 6)
    assert torch.allclose(torch.linalg.matrix_norm(q), norms)  # ||Q||_F = sqrt(2) ||params||
    cos = torch.nn.functional.cosine_similarity(params[1:], before[1:], dim=1)
    assert torch.allclose(cos, torch.ones(4, dtype=torch.float64))  # same direction


def test_rotate_weight_equals_dense_block_diagonal_product():
    w = torch.randn(5, 12, dtype=torch.float64)
    r = cayley_exact(_random_skew(3, 4, rho=1.0))
    assert torch.allclose(rotate_weight(w, r), w @ torch.block_diag(*r), atol=1e-13)

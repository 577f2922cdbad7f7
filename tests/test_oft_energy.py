"""Hyperspherical energy against a brute-force double loop."""

import itertools

import pytest
import torch

from src.oft import hyperspherical_energy


def brute_force_he(weight: torch.Tensor) -> float:
    rows = [w / w.norm() for w in weight.reshape(weight.shape[0], -1).double()]
    return sum(
        1.0 / (rows[i] - rows[j]).norm().item() for i, j in itertools.permutations(range(len(rows)), 2)
    )


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 2, 2), (2, 7)])
def test_matches_double_loop(shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    assert hyperspherical_energy(weight).item() == pytest.approx(brute_force_he(weight), rel=1e-10)


def test_chunking_and_scale_invariance():
    weight = torch.randn(37, 9, dtype=torch.float64)
    full = hyperspherical_energy(weight)
    assert torch.allclose(hyperspherical_energy(weight, chunk_size=5), full, rtol=1e-13)
    assert torch.allclose(
        hyperspherical_energy(weight * torch.rand(37, 1, dtype=torch.float64)), full, rtol=1e-12
    )


def test_spread_neurons_have_lower_energy():
    orthonormal = torch.eye(4, dtype=torch.float64)
    clustered = orthonormal + 3.0  # all neurons point roughly the same way
    assert hyperspherical_energy(orthonormal) < hyperspherical_energy(clustered)

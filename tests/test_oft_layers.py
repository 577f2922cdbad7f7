"""Layer invariants across Linear and Conv2d variants, shared/unshared blocks and both Cayley forms."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from src.oft import OFTConfig, OFTConv2d, OFTLinear, hyperspherical_energy, merge_oft, unmerge_oft
from src.oft.rotation import skew_from_params

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny ops: one thread, no OpenMP contention

# name -> (factory, input shape); conv inputs are 32x32 as the spec asks
LAYERS = {
    "linear": (lambda: nn.Linear(16, 6), (3, 5, 16)),
    "conv_k1": (lambda: nn.Conv2d(8, 6, 1), (2, 8, 32, 32)),
    "conv_k3_s2_p1": (lambda: nn.Conv2d(8, 6, 3, stride=2, padding=1), (2, 8, 32, 32)),
    "conv_k5_d2_p1": (lambda: nn.Conv2d(8, 6, 5, dilation=2, padding=1), (2, 8, 32, 32)),
    "conv_k3_g2_p1": (lambda: nn.Conv2d(8, 6, 3, padding=1, groups=2), (2, 8, 32, 32)),
}
VARIANTS = [(share, method) for share in (False, True) for method in ("exact", "neumann")]
RHO = {"exact": 2.0, "neumann": 0.4}  # spectral norm of each random block (Neumann needs rho < 1)


def make_layer(kind: str, share: bool, method: str, seed: int = 0):
    torch.manual_seed(seed)
    factory, shape = LAYERS[kind]
    base = factory().double()
    config = OFTConfig(n_blocks=2, block_share=share, cayley=method, target_modules=[".*"])
    wrapper = OFTLinear if kind == "linear" else OFTConv2d
    return base, wrapper(base, config, name=kind), torch.randn(shape, dtype=torch.float64)


def randomize_(layer, rho: float, seed: int = 1) -> None:
    """Random non-zero skew blocks, each scaled to spectral norm ``rho``."""
    gen = torch.Generator().manual_seed(seed)
    params = torch.randn(layer.oft_skew.shape, generator=gen, dtype=torch.float64)
    q_norm = torch.linalg.matrix_norm(skew_from_params(params, layer.block_size), ord=2)
    with torch.no_grad():
        layer.oft_skew.copy_(params * (rho / q_norm)[:, None])


def dense_rotation(layer) -> torch.Tensor:
    """Independent reference: per-block ``(I + Q) inv(I - Q)`` from the raw parameters, then block_diag."""
    b = layer.block_size
    rows, cols = torch.triu_indices(b, b, 1)
    blocks = []
    for params in layer.oft_skew.detach():
        q = torch.zeros(b, b, dtype=params.dtype)
        q[rows, cols] = params
        q = q - q.T
        eye = torch.eye(b, dtype=q.dtype)
        blocks.append((eye + q) @ torch.linalg.inv(eye - q))
    return torch.block_diag(*(blocks * layer.n_blocks if layer.block_share else blocks))


def reference_output(base, rot: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    weight = (base.weight.reshape(base.weight.shape[0], -1) @ rot).view_as(base.weight)
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, base.bias)
    return F.conv2d(x, weight, base.bias, base.stride, base.padding, base.dilation, base.groups)


params = pytest.mark.parametrize("kind", list(LAYERS))
variants = pytest.mark.parametrize("share,method", VARIANTS)


@params
@variants
def test_identity_at_init(kind, share, method):
    base, layer, x = make_layer(kind, share, method)
    assert not any(p.requires_grad for p in base.parameters())
    assert layer.oft_skew.requires_grad and not layer.oft_skew.any()
    assert (layer(x) - base(x)).abs().max() < 1e-12


@params
@variants
def test_random_rotation_is_orthogonal_and_changes_output(kind, share, method):
    base, layer, x = make_layer(kind, share, method)
    randomize_(layer, RHO[method])
    r = layer.rotation()
    r_dense = torch.block_diag(*r)
    err = (r_dense.T @ r_dense - torch.eye(r_dense.shape[0], dtype=r.dtype)).abs().max()
    if method == "exact":
        assert err < 1e-10
    else:  # ||R^T R - I||_2 <= rho^(2k) for odd k = 5: 0.4^10 ~ 1e-4 (see rotation.neumann_orthogonality_bound)
        assert err <= RHO[method] ** (2 * layer.neumann_terms) * (1 + 1e-9)
        assert err > 0  # the approximation is not exactly orthogonal: the bound is what is tested
    assert (layer(x) - base(x)).abs().max() > 1e-3
    if share:
        assert torch.equal(r[0], r[-1])


@params
@variants
def test_merged_equals_unmerged_and_unmerge_restores(kind, share, method):
    _, layer, x = make_layer(kind, share, method)
    randomize_(layer, RHO[method])
    model = nn.Sequential(layer)
    adapted = model(x)
    removed = merge_oft(model)
    assert type(model[0]) is type(layer.base) and list(removed) == ["0"]
    assert (model(x) - adapted).abs().max() < 1e-12
    unmerge_oft(model, removed)
    assert model[0] is layer and torch.equal(model(x), adapted)


@params
@variants
def test_output_equals_independent_dense_reference(kind, share, method):
    """The layer equals F.linear/F.conv2d with an independently computed rotated weight (exact Cayley);
    for Neumann the reference uses the same (exact) inverse, so agreement is up to ``rho^k``."""
    base, layer, x = make_layer(kind, share, method)
    randomize_(layer, RHO[method])
    ref = reference_output(base, dense_rotation(layer), x)
    tol = 1e-10 if method == "exact" else 10 * RHO[method] ** layer.neumann_terms
    assert (layer(x) - ref).abs().max() < tol * ref.abs().max()


@params
@pytest.mark.parametrize("share", [False, True])
def test_hyperspherical_energy_preserved_by_exact_rotation(kind, share):
    base, layer, _ = make_layer(kind, share, "exact")
    randomize_(layer, RHO["exact"])
    rotated = layer.rotated_weight()
    assert (rotated - base.weight).abs().max() > 1e-2
    assert torch.allclose(hyperspherical_energy(rotated), hyperspherical_energy(base.weight), rtol=1e-12)


@params
@variants
def test_gradcheck_wrt_skew_params(kind, share, method):
    base, layer, x = make_layer(kind, share, method)
    randomize_(layer, 0.5 * RHO[method])
    x = x[:1, :, :9, :9] if x.dim() == 4 else x[:1]

    def forward(skew):
        return torch.func.functional_call(layer, {"oft_skew": skew}, (x,), strict=False)

    skew = layer.oft_skew.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(forward, (skew,), fast_mode=skew.numel() > 200)


@pytest.mark.parametrize("method", ["exact", "neumann"])
def test_linear_impls_agree_and_custom_backward_is_correct(method):
    """The merged-weight custom autograd function against the autograd-derived input-centric form."""
    base, layer, x = make_layer("linear", False, method)
    randomize_(layer, RHO[method])
    config = OFTConfig(n_blocks=2, cayley=method, target_modules=[".*"])
    other = OFTLinear(base, config, impl="input")
    other.load_state_dict(layer.state_dict())
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    g = torch.randn(3, 5, 6, dtype=torch.float64)
    (layer(x1) * g).sum().backward()
    (other(x2) * g).sum().backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-12)
    assert torch.allclose(layer.oft_skew.grad, other.oft_skew.grad, atol=1e-12)
    # the custom backward w.r.t. x, W, c and R itself, with a non-orthogonal invertible R: the
    # blockwise-solve formula for dL/dR must hold for any invertible R (Neumann R is not orthogonal)
    from src.oft.layers import _RotatedLinearFn

    rot = torch.eye(8, dtype=torch.float64) + 0.3 * torch.randn(2, 8, 8, dtype=torch.float64)
    inputs = (x[:, :2], base.weight, base.bias, rot)
    inputs = tuple(t.detach().clone().requires_grad_(True) for t in inputs)
    assert torch.autograd.gradcheck(_RotatedLinearFn.apply, inputs)


def test_non_dividing_block_size_names_the_layer():
    config = OFTConfig(block_size=48, target_modules=[".*"])
    with pytest.raises(
        ValueError,
        match=r"block_size 48 does not divide in_features 320 of layer 'down.0.attn1.to_q'; choose a divisor of 320 such as 40 or 64",
    ):
        OFTLinear(nn.Linear(320, 8), config, name="down.0.attn1.to_q")
    with pytest.raises(
        ValueError, match=r"in_channels/groups\*kh\*kw 72 of layer 'c'.*36 or 72"
    ):  # conv: in * k * k = 8*3*3
        OFTConv2d(nn.Conv2d(8, 4, 3), config, name="c")


@pytest.mark.parametrize("tokens", [3, 40])
def test_auto_impl_picks_the_cheaper_path_and_agrees_with_both(tokens):
    """`impl="auto"` rotates the input for few tokens and the weight for many; outputs and grads agree."""
    torch.manual_seed(0)
    base = nn.Linear(8, 16).double()
    config = OFTConfig(block_size=4, cayley="exact", target_modules=[".*"])
    layers = {impl: OFTLinear(base, config, impl=impl) for impl in ("auto", "merged", "input")}
    skew = torch.randn_like(layers["auto"].oft_skew) * 0.2
    for layer in layers.values():
        layer.oft_skew.data.copy_(skew)
    x = torch.randn(tokens, 8, dtype=torch.float64)
    assert layers["auto"].uses_merged(x) == (tokens >= 16)
    outputs, grads = {}, {}
    for impl, layer in layers.items():
        out = layer(x)
        out.square().sum().backward()
        outputs[impl], grads[impl] = out, layer.oft_skew.grad
    for impl in ("merged", "input"):
        torch.testing.assert_close(outputs["auto"], outputs[impl], rtol=0, atol=1e-12)
        torch.testing.assert_close(grads["auto"], grads[impl], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="impl 'fast' must be one of"):
        OFTLinear(base, config, impl="fast")


# The paper preset's exact Cayley on SD1.5's layer widths after `torch.set_num_threads(2)` (as Lightning
# sets in some CPU strategies): a batched LU solve hung there (MKL "SLASWP" errors) for blocks >= ~159.
TWO_THREAD_SCRIPT = r"""
import torch
from omegaconf import OmegaConf
from torch import nn
from src.oft import OFTConfig, OFTLinear

torch.set_num_threads(2)
config = OFTConfig.from_dict(OmegaConf.to_container(OmegaConf.load("conf/oft/paper.yaml")))
assert config.cayley == "exact" and config.n_blocks == 4
torch.manual_seed(0)
for width, inputs in [(320, 320), (640, 640), (1280, 1280), (320, 768)]:
    for impl in ("input", "merged"):
        layer = OFTLinear(nn.Linear(inputs, width), config, impl=impl)
        with torch.no_grad():
            layer.oft_skew.normal_(0, 0.01)
        x = torch.randn(2, 64, inputs, requires_grad=True)
        layer(x).square().mean().backward()
        rotation = layer.rotation()
        eye = torch.eye(rotation.shape[-1])
        error = (rotation.mT @ rotation - eye).abs().max().item()
        assert error < 1e-5, (width, impl, error)
        assert torch.isfinite(layer.oft_skew.grad).all() and layer.oft_skew.grad.abs().sum() > 0
        assert torch.isfinite(x.grad).all()
print("ok", torch.get_num_threads())
"""


def test_exact_cayley_forward_backward_with_two_threads_finishes():
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, "-c", TWO_THREAD_SCRIPT],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["ok", "2"]
    assert "SLASWP" not in done.stderr

"""OFT layers: a frozen ``nn.Linear`` / ``nn.Conv2d`` whose input space is rotated, ``y = W (R x) + c``."""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.errors import ConfigError

from .config import OFTConfig
from .rotation import (
    cayley,
    n_skew_params,
    project_skew_params_,
    rotate_weight,
    skew_from_params,
    solve_transposed,
)


class OFTLayer(nn.Module):
    """Frozen base layer plus the free entries of its skew blocks (``oft_skew``, zeros at init: ``R = I``).

    ``oft_skew`` has shape ``[n_stored, b(b-1)/2]`` with ``n_stored = n_blocks`` (or 1 with
    ``block_share``). The base layer is kept unchanged (``requires_grad_(False)``), so un-merging is
    exact: see ``merge_oft`` / ``unmerge_oft``.
    """

    base: nn.Module
    features_name = "in_features"  # how error messages call the rotated dimension

    def __init__(self, base: nn.Module, config: OFTConfig, name: str = "") -> None:
        super().__init__()
        features, what = self.rotated_features(base), self.features_name
        n_blocks, block_size = config.blocks_for(features, name or type(base).__name__, what)
        base.requires_grad_(False)
        self.base = base
        self.n_blocks, self.block_size, self.block_share = n_blocks, block_size, config.block_share
        self.cayley, self.neumann_terms = config.cayley, config.neumann_terms
        n_stored = 1 if config.block_share else n_blocks
        self.coft_radius = config.coft_radius(block_size, n_stored) if config.coft else None
        weight = base.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        self.oft_skew = nn.Parameter(
            torch.zeros(n_stored, n_skew_params(block_size), dtype=dtype, device=weight.device)
        )
        #: the blocks of ``R`` computed with other layers' (``src.oft.inject.batched_rotations``), or None
        self.batched: Tensor | None = None

    @staticmethod
    def rotated_features(base: nn.Module) -> int:
        """Dimension of the rotated space: the size of one row of the weight viewed as ``[out, -1]``."""
        return base.weight[0].numel()

    def rotation(self, scale: float = 1.0) -> Tensor:
        """The diagonal blocks of ``R``, ``[n_blocks, b, b]`` (a broadcast view when blocks are shared).

        ``scale`` multiplies the skew-symmetric generator ``Q``: ``R(scale Q)`` is orthogonal for every scale,
        the identity at 0 and the trained rotation at 1 (composition's per-run rotation scale). Inside
        ``batched_rotations`` the blocks computed there are returned (``scale`` 1)."""
        if scale == 1 and self.batched is not None:
            return self.batched
        skew = skew_from_params(self.oft_skew if scale == 1 else scale * self.oft_skew, self.block_size)
        return self.placed(cayley(skew, self.cayley, self.neumann_terms))

    def placed(self, blocks: Tensor) -> Tensor:
        """Computed blocks as ``R``'s diagonal: one shared block is broadcast to every position."""
        return blocks.expand(self.n_blocks, -1, -1) if self.block_share else blocks

    def rotated_weight(self) -> Tensor:
        """``W' = W R`` with the base weight viewed as ``[out, -1]``, returned in the base weight's shape."""
        weight = self.base.weight
        rotation = self.rotation().to(weight.dtype)
        return rotate_weight(weight.reshape(weight.shape[0], -1), rotation).view_as(weight)

    def merged_module(self) -> nn.Module:
        """A plain copy of the base layer with ``W R`` baked in (frozen, no inference overhead)."""
        merged = copy.deepcopy(self.base)
        with torch.no_grad():
            merged.weight.copy_(self.rotated_weight())
        return merged

    def project_coft_(self) -> None:
        """Clip every block to ``||Q||_F <= coft_radius`` in place (no-op when COFT is off)."""
        if self.coft_radius is not None:
            project_skew_params_(self.oft_skew.data, self.coft_radius)

    def extra_repr(self) -> str:
        share = ", block_share" if self.block_share else ""
        coft = f", coft_radius={self.coft_radius:.4g}" if self.coft_radius is not None else ""
        return f"n_blocks={self.n_blocks}, block_size={self.block_size}, cayley={self.cayley}{share}{coft}"


class _RotatedLinearFn(torch.autograd.Function):
    """``y = x (W R)^T + c`` on the merged weight ``W' = W R``; the backward never forms ``dL/dW'``.

    Backward, with ``g = dL/dy``: ``dL/dx = g W'`` (the one GEMM a frozen layer needs too). The
    gradient w.r.t. the rotated input ``R x`` is ``u = g W = (dL/dx) R^-1`` blockwise, hence
    ``dL/dR_k = u_k^T x_k = R_k^-T M_k`` with ``M_k = (dL/dx)_k^T x_k`` (a ``b x b`` contraction over
    tokens). With ``orthogonal=True`` (exact Cayley) ``R_k^-T = R_k``, a product; otherwise a batched
    SPD solve (:func:`solve_transposed`): exact for any invertible ``R`` (Neumann included).
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, rotation: Tensor, orthogonal: bool = False
    ) -> Tensor:
        rotated = rotate_weight(weight, rotation)
        ctx.save_for_backward(x, rotated, rotation)
        ctx.orthogonal = orthogonal
        return F.linear(x, rotated, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, rotated, rotation = ctx.saved_tensors
        n, b, _ = rotation.shape
        dtype = rotated.dtype  # under autocast the forward ran in half precision; work in that dtype
        g2 = grad_out.reshape(-1, rotated.shape[0]).to(dtype)
        x2 = x.reshape(-1, n * b).to(dtype)
        grad_x2 = g2 @ rotated
        grad_w = grad_b = grad_r = None
        if ctx.needs_input_grad[1]:  # dL/dW = (dL/dW') R^T blockwise
            grad_w = rotate_weight(g2.t() @ x2, rotation.transpose(1, 2).to(dtype)).to(rotation.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        if ctx.needs_input_grad[3]:
            m = torch.einsum("tnc,tnb->ncb", grad_x2.view(-1, n, b), x2.view(-1, n, b))
            # in at least float32: Cholesky has no half-precision kernels (bf16-/16-mixed training)
            wide = torch.promote_types(rotation.dtype, torch.float32)
            rot, m = rotation.to(wide), m.to(wide)
            grad_r = (rot @ m if ctx.orthogonal else solve_transposed(rot, m)).to(rotation.dtype)
        grad_x = grad_x2.view(x.shape).to(x.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, grad_w, grad_b, grad_r, None


def rotate_input(x: Tensor, rotation: Tensor) -> Tensor:
    """Input-centric ``R x`` on the last dimension: reshape to ``[..., n, b]``, ``x_k <- R_k x_k``."""
    n, b, _ = rotation.shape
    rotated = torch.einsum("tnb,ncb->tnc", x.reshape(-1, n, b), rotation)
    return rotated.reshape(x.shape)


class OFTLinear(OFTLayer):
    """OFT around a frozen ``nn.Linear``: ``y = W (R x) + c``.

    Two exact ways to compute it, chosen per call by ``impl="auto"`` (default) from their cost:

    - ``"merged"`` runs the forward on ``W R`` (``out*in*b`` multiply-adds to build, once per call) with a
      custom backward; it wins when many tokens share the weight (``tokens >= out_features``), e.g. SD at
      512 px, where it adds about 7% to the frozen layer (see benchmarks/README.md).
    - ``"input"`` rotates the input blockwise (``tokens*in*b``) and lets autograd differentiate; it wins
      when few tokens pass (low resolution, the deepest UNet blocks, small batches).

    All choices agree to float precision.
    """

    IMPLS = ("auto", "merged", "input")

    def __init__(
        self,
        base: nn.Linear,
        config: OFTConfig,
        name: str = "",
        impl: Literal["auto", "merged", "input"] = "auto",
    ) -> None:
        if not isinstance(base, nn.Linear):
            raise TypeError(f"OFTLinear wraps nn.Linear, got {type(base).__name__} for layer {name!r}")
        if impl not in self.IMPLS:
            raise ConfigError(f"impl {impl!r} must be one of {self.IMPLS}")
        super().__init__(base, config, name)
        self.impl = impl

    def uses_merged(self, x: Tensor) -> bool:
        """Whether this call takes the merged-weight path (see the class docstring for the cost model)."""
        if self.impl != "auto":
            return self.impl == "merged"
        return x.numel() // x.shape[-1] >= self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        rotation = self.rotation().to(x.dtype)
        if not self.uses_merged(x):
            return F.linear(rotate_input(x, rotation), self.base.weight, self.base.bias)
        orthogonal = self.cayley == "exact"
        return _RotatedLinearFn.apply(x, self.base.weight, self.base.bias, rotation, orthogonal)


class OFTConv2d(OFTLayer):
    """OFT around a frozen ``nn.Conv2d``: rotate the flattened patch space of size ``in/groups * kh * kw``.

    Equivalent to the weight viewed as ``[out, in/groups*kh*kw]`` times block-diagonal ``R`` (the same
    ``R`` for every group), so it is correct for any kernel, stride, padding, dilation, groups and
    padding mode: the forward is the base convolution with the rotated weight.
    """

    features_name = "in_channels/groups*kh*kw"

    def __init__(self, base: nn.Conv2d, config: OFTConfig, name: str = "") -> None:
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"OFTConv2d wraps nn.Conv2d, got {type(base).__name__} for layer {name!r}")
        super().__init__(base, config, name)

    def forward(self, x: Tensor) -> Tensor:
        return self.base._conv_forward(x, self.rotated_weight(), self.base.bias)

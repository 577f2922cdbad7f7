"""OFT configuration: which layers get a rotation, how big its blocks are, how it is parameterised."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from src.errors import ConfigError

CAYLEY_METHODS = ("exact", "neumann")


@dataclass
class OFTConfig:
    """Orthogonal Finetuning settings (Qiu et al. 2023, arXiv 2306.07280; OFTv2, arXiv 2506.19847).

    A frozen layer ``y = W x + c`` becomes ``y = W (R x) + c`` with a block-diagonal orthogonal ``R``
    acting on the layer's input space (``in_features`` for Linear, ``in/groups * kh * kw`` for Conv2d).

    Args:
        block_size: size ``b`` of each diagonal block of ``R``. Give exactly one of ``block_size`` and
            ``n_blocks``; the other is derived per layer (``n_blocks = features / b``).
        n_blocks: number of diagonal blocks per layer (the paper's and the official code's ``r``).
        block_share: one block, repeated along the diagonal (``b(b-1)/2`` parameters per layer).
        coft: constrained OFT. ``project_coft_`` clips every block's skew matrix to ``||Q||_F <= radius``.
        eps: COFT strength, in the official code's convention. The radius of a layer is
            ``eps' = eps * b**2 / sqrt(n_stored)``, where ``n_stored`` is the number of stored blocks
            (``n_blocks``, or 1 with ``block_share``); ``eps = 1e-3`` reproduces the official README runs.
        cayley: ``"exact"``: ``R = (I + Q)(I - Q)^-1`` by a batched Cholesky solve. ``"neumann"``:
            ``R = (I + Q)(I + Q + ... + Q^(k-1))`` with ``k = neumann_terms`` (same orientation; peft's
            ``num_cayley_neumann_terms`` is ``k + 1``). Its orthogonality error is bounded by
            ``||R^T R - I||_2 <= 2 rho^k + rho^(2k)``, ``rho = ||Q||_2`` (``rho^(2k)`` for odd ``k``).
        neumann_terms: ``k``, the number of terms of the truncated series for ``(I - Q)^-1``.
        target_modules: regular expressions, each matched with ``re.fullmatch`` against the qualified
            names (``model.named_modules()``) of ``nn.Linear`` and ``nn.Conv2d`` modules, e.g.
            ``r".*attn1\\.to_q"``. A module is adapted if any target matches and no exclude matches.
        exclude_modules: regular expressions (``re.fullmatch``) of qualified names to leave alone.
    """

    block_size: int | None = None
    n_blocks: int | None = None
    block_share: bool = False
    coft: bool = False
    eps: float = 1e-3
    cayley: Literal["exact", "neumann"] = "exact"
    neumann_terms: int = 5
    target_modules: list[str] = field(default_factory=list)
    exclude_modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.target_modules = _as_pattern_list(self.target_modules, "target_modules")
        self.exclude_modules = _as_pattern_list(self.exclude_modules, "exclude_modules")
        self._validate_blocks()
        if self.cayley not in CAYLEY_METHODS:
            raise ConfigError(
                f"cayley {self.cayley!r} is not one of {CAYLEY_METHODS}; use 'exact' or 'neumann'"
            )
        if int(self.neumann_terms) != self.neumann_terms or self.neumann_terms < 1:
            raise ConfigError(f"neumann_terms {self.neumann_terms!r} must be an integer >= 1 (e.g. 5)")
        if self.coft and not (isinstance(self.eps, int | float) and self.eps > 0 and math.isfinite(self.eps)):
            raise ConfigError(
                f"eps {self.eps!r} must be a positive finite number when coft is on (e.g. 1e-3)"
            )

    def _validate_blocks(self) -> None:
        if (self.block_size is None) == (self.n_blocks is None):
            raise ConfigError(
                f"give exactly one of block_size ({self.block_size}) and n_blocks ({self.n_blocks}); "
                "set the other to null/None"
            )
        if self.block_size is not None and (int(self.block_size) != self.block_size or self.block_size < 2):
            raise ConfigError(
                f"block_size {self.block_size!r} must be an integer >= 2 (a 1x1 rotation is fixed)"
            )
        if self.n_blocks is not None and (int(self.n_blocks) != self.n_blocks or self.n_blocks < 1):
            raise ConfigError(f"n_blocks {self.n_blocks!r} must be an integer >= 1")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> OFTConfig:
        """Build from a plain mapping (e.g. a resolved Hydra node); ``_target_`` is ignored."""
        values = {k: v for k, v in values.items() if k != "_target_"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown OFTConfig field(s) {unknown}; valid fields are {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain-python copy of the fields (for checkpoints and logs)."""
        return dataclasses.asdict(self)

    def blocks_for(self, features: int, layer_name: str, what: str = "in_features") -> tuple[int, int]:
        """``(n_blocks, block_size)`` for a layer whose rotated space has ``features`` dimensions.

        ``what`` names that dimension in error messages (``in_features``, or the conv patch size).
        """
        if self.block_size is not None:
            if features % self.block_size:
                raise ConfigError(
                    f"block_size {self.block_size} does not divide {what} {features} of layer "
                    f"{layer_name!r}; choose a divisor of {features} such as "
                    f"{_near_divisors(features, self.block_size)}, or use n_blocks"
                )
            return features // self.block_size, self.block_size
        assert self.n_blocks is not None
        if features % self.n_blocks or features // self.n_blocks < 2:
            raise ConfigError(
                f"n_blocks {self.n_blocks} does not split {what} {features} of layer {layer_name!r} "
                f"into blocks of size >= 2; choose a divisor of {features} such as "
                f"{_near_divisors(features, self.n_blocks)}, or use block_size"
            )
        return self.n_blocks, features // self.n_blocks

    def coft_radius(self, block_size: int, n_stored: int) -> float:
        """COFT radius ``eps' = eps * b^2 / sqrt(n_stored)`` (official OFT convention)."""
        return self.eps * block_size**2 / math.sqrt(n_stored)


def _as_pattern_list(patterns: Iterable[str] | str | None, what: str) -> list[str]:
    """Normalise a string or sequence (e.g. an omegaconf ListConfig) to a list of compiled-checked regexes."""
    if patterns is None:
        return []
    out = [patterns] if isinstance(patterns, str) else [str(p) for p in patterns]
    for pattern in out:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"{what} pattern {pattern!r} is not a valid regular expression: {err}") from err
    return out


def _near_divisors(n: int, near: int) -> str:
    """The divisors of ``n`` just below and above ``near`` (>= 2), as 'a or b'."""
    divisors = [d for d in range(2, n + 1) if n % d == 0]
    below = [d for d in divisors if d < near][-1:]
    above = [d for d in divisors if d > near][:1]
    return " or ".join(str(d) for d in below + above) or str(n)

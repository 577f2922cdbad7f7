"""Our `OFTConfig` and rotations in peft's terms (peft's `tuners/oft`), for export and comparison.

Our rotation of an input `x` is `R x` with `R = cayley(Q)`. peft multiplies rows, `x^T R_peft`, with
`R_peft = (I - Q)(I + Q)^-1` for exact Cayley, whose transpose is our `R`: the same `Q` is stored.
peft's Cayley-Neumann series is our series' polynomial in `Q` with one more term counted, applied from
the right, so the transpose is obtained with `-Q`: `skew_sign` is -1 for the Neumann form.

COFT radii: peft clips each block to `eps / sqrt(n_stored)`, ours is `eps * b^2 / sqrt(n_stored)`
(`OFTConfig.eps`), so a peft rotation gets `eps * b^2` (`match_coft_radius`) to constrain the same ball.
peft projects before every forward, we after every optimizer step.

peft is imported on first use: the rest of `src.oft` does not need it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .config import OFTConfig
from .inject import oft_layers
from .layers import OFTLinear

#: where peft saves a layer's skew parameters, relative to `base_model.model.<layer name>`
PEFT_WEIGHT = "oft_R.weight"


def union_pattern(patterns: Sequence[str]) -> str | None:
    """Our list of `re.fullmatch` patterns as the one regex peft fullmatches against module names."""
    return "|".join(f"(?:{p})" for p in patterns) or None


def cayley_settings(config: OFTConfig) -> dict[str, Any]:
    """peft's Cayley options for ours: exact, or the Neumann series with one more term (peft counts `I`)."""
    if config.cayley == "exact":
        return {"use_cayley_neumann": False}
    if config.neumann_terms < 3:
        raise ValueError(
            f"oft.neumann_terms {config.neumann_terms} has no peft equivalent (peft's series starts at 3 "
            "of our terms): export the merged diffusers folder instead"
        )
    return {"use_cayley_neumann": True, "num_cayley_neumann_terms": config.neumann_terms + 1}


def skew_sign(config: OFTConfig) -> float:
    """The factor that maps our skew parameters to peft's: +1 for exact Cayley, -1 for Neumann."""
    return 1.0 if config.cayley == "exact" else -1.0


def peft_oft_config(config: OFTConfig, target_modules: Sequence[str] | None = None, **options: Any):
    """peft's `OFTConfig` for the same rotations: blocks, sharing, Cayley form and targets.

    `target_modules`: explicit module names (default: our patterns as one regex, with our excludes).
    COFT follows `config.coft` unless `options` say otherwise; set its radii with `match_coft_radius`.
    """
    import peft

    targets: Any = (
        sorted(target_modules) if target_modules is not None else union_pattern(config.target_modules)
    )
    excludes = None if target_modules is not None else union_pattern(config.exclude_modules)
    settings = dict(
        r=config.n_blocks or 0,
        oft_block_size=config.block_size or 0,
        block_share=config.block_share,
        coft=config.coft,
        module_dropout=0.0,
        init_weights=True,
        target_modules=targets,
        exclude_modules=excludes,
        **cayley_settings(config),
    )
    return peft.OFTConfig(**{**settings, **options})


def match_coft_radius(model: nn.Module, config: OFTConfig) -> None:
    """Give every peft OFT rotation of `model` the COFT radius ours uses (`eps * b^2`, see the module doc)."""
    from peft.tuners.oft.layer import OFTRotationModule

    for module in model.modules():
        if isinstance(module, OFTRotationModule):
            module.eps = config.eps * module.block_size**2


def peft_adapter(
    model: nn.Module, config: OFTConfig, base: str | None = None
) -> tuple[Any, dict[str, torch.Tensor]]:
    """A peft `OFTConfig` and adapter state dict (peft's saved key layout) equal to the OFT layers of `model`.

    COFT is off in the adapter: the rotations already satisfy the constraint, and peft would re-project
    them with its own radius convention at every forward.
    """
    layers = dict(oft_layers(model))
    convs = [name for name, layer in layers.items() if not isinstance(layer, OFTLinear)]
    if convs:
        raise ValueError(
            f"peft export supports OFT on nn.Linear only, but {convs[:3]} are convolutions (peft's Conv2d "
            "OFT rotates another space for kernels > 1): export the merged diffusers folder"
        )
    peft_config = peft_oft_config(
        config, target_modules=list(layers), coft=False, inference_mode=True, base_model_name_or_path=base
    )
    sign = skew_sign(config)
    state = {
        f"base_model.model.{name}.{PEFT_WEIGHT}": (sign * layer.oft_skew.detach()).cpu().contiguous()
        for name, layer in layers.items()
    }
    return peft_config, state

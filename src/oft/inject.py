"""Put OFT into a model: match qualified module names, replace layers, count, save/load, merge."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from src.errors import CheckpointError, ConfigError

from .config import OFTConfig
from .layers import OFTConv2d, OFTLayer, OFTLinear
from .rotation import cayley, skew_from_params

SUPPORTED = {nn.Linear: OFTLinear, nn.Conv2d: OFTConv2d}
PARAM_NAME = "oft_skew"


def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every ``nn.Linear``/``nn.Conv2d`` not already inside an OFT layer."""
    wrapped: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in wrapped):
            continue
        if isinstance(module, OFTLayer):
            wrapped.append(f"{name}.")
        elif type(module) in SUPPORTED and name:  # the root itself cannot be swapped in place
            yield name, module


def _is_target(name: str, config: OFTConfig) -> bool:
    """Any target pattern and no exclude pattern matches the whole qualified name (``re.fullmatch``)."""
    hit = any(re.fullmatch(p, name) for p in config.target_modules)
    return hit and not any(re.fullmatch(p, name) for p in config.exclude_modules)


def _nothing_matched(config: OFTConfig, names: list[str]) -> ConfigError:
    examples = ", ".join(repr(n) for n in names[:4]) or "none: the model has no nn.Linear/nn.Conv2d"
    return ConfigError(
        f"OFT target_modules {config.target_modules} (exclude_modules {config.exclude_modules}) matched "
        f"none of the {len(names)} nn.Linear/nn.Conv2d modules; patterns must match the whole qualified "
        f"name (re.fullmatch), e.g. '.*attn1\\.to_q'. Example module names: {examples}"
    )


def target_layers(model: nn.Module, config: OFTConfig) -> list[str]:
    """Qualified names of the ``nn.Linear``/``nn.Conv2d`` layers of ``model`` that ``config`` targets (the
    layers :func:`inject_oft` would adapt; other adapters, e.g. LoRA, use them to adapt the same layers).
    Raises a ``ConfigError`` with example names when none matches."""
    candidates = [name for name, _ in _candidates(model)]
    targets = [name for name in candidates if _is_target(name, config)]
    if not targets:
        raise _nothing_matched(config, candidates)
    return targets


def inject_oft(model: nn.Module, config: OFTConfig) -> list[str]:
    """Replace every matching ``nn.Linear``/``nn.Conv2d`` of ``model`` by its OFT layer, in place.

    All targets are built before any is swapped, so a non-dividing block size (a ``ValueError`` naming
    the layer) leaves the model untouched. The base layer moves to ``<name>.base`` and is frozen; the
    other parameters of the model are left as they are (freeze them yourself). Returns the adapted names.
    """
    candidates = list(_candidates(model))
    targets = [(name, module) for name, module in candidates if _is_target(name, config)]
    if not targets:
        raise _nothing_matched(config, [name for name, _ in candidates])
    layers = {name: SUPPORTED[type(module)](module, config, name) for name, module in targets}
    for name, layer in layers.items():
        model.set_submodule(name, layer)
    return list(layers)


def oft_layers(model: nn.Module) -> Iterator[tuple[str, OFTLayer]]:
    """``(qualified name, layer)`` of every OFT layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, OFTLayer):
            yield name, module


def oft_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The trainable OFT parameters (one ``oft_skew`` per layer), e.g. for an optimizer."""
    for _, layer in oft_layers(model):
        yield layer.oft_skew


def oft_parameter_count(model: nn.Module) -> int:
    """Rotation degrees of freedom: free skew entries, ``n_stored * b(b-1)/2`` summed over layers."""
    return sum(p.numel() for p in oft_parameters(model))


@contextmanager
def batched_rotations(model: nn.Module) -> Iterator[None]:
    """Inside the block, every OFT layer's rotation is computed once, together with those of the other layers
    of the same block size and parameterisation: one Cayley transform (and one backward) per group instead of
    one per layer. The values are the same; the many small calls were a fifth of a toy training step
    (benchmarks/README.md). The blocks are computed on entry, so the weights must not change inside the
    block (one forward, or a sampling loop); gradients reach every layer's ``oft_skew`` through them. Under
    gradient checkpointing (``model.is_gradient_checkpointing``) the backward recomputes the layers outside the
    block, so each layer computes its own rotation, as it did in the forward, and nothing is batched."""
    if getattr(model, "is_gradient_checkpointing", False):
        yield
        return
    groups: dict[tuple, list[OFTLayer]] = defaultdict(list)
    for _, layer in oft_layers(model):
        skew = layer.oft_skew
        groups[(layer.block_size, layer.cayley, layer.neumann_terms, skew.dtype, skew.device)].append(layer)
    try:
        for (block_size, method, terms, *_), layers in groups.items():
            skew = skew_from_params(torch.cat([layer.oft_skew for layer in layers]), block_size)
            blocks = cayley(skew, method, terms).split([layer.oft_skew.shape[0] for layer in layers])
            for layer, own in zip(layers, blocks, strict=True):
                layer.batched = layer.placed(own)
        yield
    finally:
        for layers in groups.values():
            for layer in layers:
                layer.batched = None


@torch.no_grad()
def project_coft_(model: nn.Module) -> None:
    """COFT: clip every block of every OFT layer to its radius (call after each optimizer step)."""
    for _, layer in oft_layers(model):
        layer.project_coft_()


def oft_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``{"<layer>.oft_skew": tensor}``: detached contiguous copies, flat keys (safetensors-ready)."""
    return {
        f"{name}.{PARAM_NAME}": layer.oft_skew.detach().clone().contiguous()
        for name, layer in oft_layers(model)
    }


def load_oft_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy ``state`` into the OFT layers of ``model``, strictly.

    Missing keys, unexpected keys and shape mismatches are all listed in one ``ValueError``, and then
    nothing is loaded.
    """
    params = {f"{name}.{PARAM_NAME}": layer.oft_skew for name, layer in oft_layers(model)}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(p.shape)}"
        for k, p in params.items()
        if k in state and state[k].shape != p.shape
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"OFT state dict does not fit the model: missing keys {missing}, unexpected keys {unexpected}, "
            f"shape mismatches {shapes}. Inject with the config the checkpoint was trained with."
        )
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state[key])


def merge_oft(model: nn.Module) -> dict[str, OFTLayer]:
    """Replace every OFT layer by a plain layer with ``W R`` baked in, in place.

    Returns the removed OFT layers (they keep the untouched frozen base); ``unmerge_oft(model, layers)``
    puts them back, which restores the adapted model exactly.
    """
    layers = dict(oft_layers(model))
    for name, layer in layers.items():
        model.set_submodule(name, layer.merged_module())
    return layers


def unmerge_oft(model: nn.Module, layers: Mapping[str, OFTLayer]) -> None:
    """Undo :func:`merge_oft`: put the OFT layers it returned back under their names."""
    for name, layer in layers.items():
        model.set_submodule(name, layer)

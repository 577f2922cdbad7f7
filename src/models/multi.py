"""Several conditions at once: one control encoder per condition, their embeddings added at `conv_in`.

Two ways to get such a model, both ending in a `MultiEncoder` over the UNet's `conv_in`:

- **Joint training**: a task whose condition names several (`task=canny_segmentation`, `condition:
  canny+seg`) gives an encoder-based method one control encoder per condition. Batches carry the
  conditions side by side (`[B, 3k, H, W]`, in the order of the names) and `present` (`[B, k]`); every
  condition of every sample is dropped independently with probability `module.condition_dropout`, and a
  condition missing from a sample counts as dropped, so any subset of the conditions works at inference.
- **Composition** (`compose_runs`): separately trained runs on one backbone. Their rotations multiply
  per layer, `W R_1 R_2 ... R_n` in the order the runs are given (a product of orthogonal matrices is
  orthogonal, so the composed layer keeps the base layer's hyperspherical energy), and their control
  embeddings add. The result is a plain UNet with the composed rotations merged plus a `MultiEncoder` of
  every run's encoders. A rotation scale per run (`rotation_scale.<condition>`, default 1) multiplies
  that run's skew-symmetric generator before the Cayley transform: `R_i(a Q_i)` stays orthogonal, is the
  identity at 0 (the run then brings its encoder only) and the trained rotation at 1.

A condition whose strength is 0 (or that is not given) is not encoded at all: the model then is exactly
the model without that encoder.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from src.errors import ConfigError
from src.oft import oft_layers, rotate_weight

if TYPE_CHECKING:
    from src.models.run import TrainedRun

#: the separator of condition names in a task's condition (`canny+seg`)
JOIN = "+"
#: methods whose runs compose: their control is an encoder at `conv_in`, their UNet change is rotations
COMPOSABLE = ("oft_control", "encoder_only")


def split_condition(condition: str | None) -> list[str]:
    """The condition names of a task's condition (`canny+seg` -> `["canny", "seg"]`; `canny` -> `["canny"]`)."""
    return [] if condition is None else str(condition).split(JOIN)


def is_multi(condition: str | None) -> bool:
    return len(split_condition(condition)) > 1


class MultiEncoder(nn.Module):
    """Control encoders by condition name; `embed` adds their embeddings, each scaled by its strength.

    `condition` is `[B, 3k, H, W]`: the conditions side by side in the order of `names`, three channels each.
    """

    def __init__(self, encoders: Mapping[str, nn.Module]) -> None:
        super().__init__()
        if not encoders:
            raise ConfigError("a multi-condition control needs at least one condition encoder")
        self.names = list(encoders)
        self.encoders = nn.ModuleDict(dict(encoders))

    @property
    def condition(self) -> str:
        return JOIN.join(self.names)

    def strength_matrix(self, strength: Any, batch: int, device: torch.device) -> Tensor:
        """`[B, k]` strengths from a number (every condition), a mapping by name (names left out: 0, i.e. not
        given) or a `[k]`/`[B, k]` tensor."""
        k = len(self.names)
        if isinstance(strength, Mapping):
            unknown = sorted(set(strength) - set(self.names))
            if unknown:
                raise ConfigError(
                    f"strength for condition(s) {unknown}, but this model's conditions are {self.names}"
                )
            strength = [float(strength.get(name, 0.0)) for name in self.names]
        values = torch.as_tensor(strength, dtype=torch.float32, device=device)
        if values.dim() == 0:
            values = values.expand(k)
        if values.shape[-1] != k or values.dim() > 2:
            raise ValueError(f"strengths of shape {tuple(values.shape)} for {k} conditions {self.names}")
        return values.expand(batch, k) if values.dim() == 1 else values

    def embed(self, condition: Tensor, strength: Any = 1.0) -> Tensor | None:
        """The sum of `strength_i * encoder_i(condition_i)`; None when every strength is 0."""
        expected = 3 * len(self.names)
        if condition.shape[-3] != expected:
            raise ValueError(
                f"condition has {condition.shape[-3]} channels; this model reads {self.names} side by side, "
                f"{expected} channels"
            )
        weights = self.strength_matrix(strength, condition.shape[0], condition.device)
        total = None
        for i, name in enumerate(self.names):
            column = weights[:, i]
            if not bool((column != 0).any()):
                continue  # not encoded at all: exactly the model without this encoder
            out = self.encoders[name](condition[:, 3 * i : 3 * i + 3])
            out = out * column.view(-1, 1, 1, 1).to(out.dtype)
            total = out if total is None else total + out
        return total

    def forward(self, condition: Tensor) -> Tensor:
        embedding = self.embed(condition)
        assert embedding is not None
        return embedding


def condition_keep(
    present: Tensor | None, batch: int, k: int, dropout: float, device: torch.device
) -> Tensor:
    """Training strengths `[B, k]`: 1 where a condition is present and not dropped (probability `dropout`)."""
    keep = (torch.rand(batch, k) >= dropout).to(device)
    if present is not None:
        keep = keep & present.to(device=device, dtype=torch.bool)
    return keep.float()


# ---------------------------------------------------------------------------------------- composition
def composed_rotation(layers: Sequence[nn.Module], scales: Sequence[float] | None = None) -> Tensor:
    """The blocks of `R_1 R_2 ... R_n` of OFT layers with one block layout (`[n_blocks, b, b]`); `scales`
    (one per layer, default 1) scale each rotation's generator (`OFTLayer.rotation`)."""
    scales = [1.0] * len(layers) if scales is None else list(scales)
    rotations = [layer.rotation(scale).detach() for layer, scale in zip(layers, scales, strict=True)]
    shapes = {tuple(r.shape) for r in rotations}
    if len(shapes) != 1:
        raise ConfigError(f"rotations of one layer have different block layouts {sorted(shapes)}")
    result = rotations[0]
    for rotation in rotations[1:]:
        result = torch.bmm(result, rotation.to(result.dtype))
    return result


def merge_composed(
    unet: nn.Module, runs_layers: Sequence[Mapping[str, nn.Module]], scales: Sequence[float] | None = None
) -> list[str]:
    """Replace every OFT layer of `unet` by a plain layer with `W R_1 ... R_n` baked in, in place.

    `runs_layers` are the OFT layers of each run by name (`dict(oft_layers(run_unet))`); the base weight `W`
    is the first run's frozen base (every run's is the same backbone's); `scales` are the runs' rotation
    scales (default 1). Returns the merged layer names.
    """
    names = list(runs_layers[0]) if runs_layers else []
    for other in runs_layers[1:]:
        if sorted(other) != sorted(names):
            raise ConfigError("the runs rotate different layers: train them with the same oft/ targets")
    for name in names:
        layers = [run_layers[name] for run_layers in runs_layers]
        base = layers[0].base
        weight = base.weight
        blocks = composed_rotation(layers, scales).to(weight.dtype)
        merged = copy.deepcopy(base)
        with torch.no_grad():
            merged.weight.copy_(rotate_weight(weight.reshape(weight.shape[0], -1), blocks).view_as(weight))
        unet.set_submodule(name, merged)
    return names


@dataclass
class Composition:
    """Separately trained runs composed on their common backbone."""

    module: Any  # the first run's module, its UNet holding the composed rotations merged
    encoder: MultiEncoder
    resolution: int
    scales: list[float]  # each run's rotation scale, in the runs' order


def check_composable(runs: Sequence[TrainedRun]) -> None:
    """Refuse (one line each) runs that cannot compose: other methods, backbones, OFT layouts, repeated
    conditions or resolutions."""
    if len(runs) < 1:
        raise ConfigError("composition needs at least one run")
    identities = [run.module.checkpoint_identity() for run in runs]
    names = [str(run.files.run_dir) for run in runs]
    for name, run, identity in zip(names, runs, identities, strict=True):
        method = identity["method"]["name"]
        if method not in COMPOSABLE:
            raise ConfigError(
                f"run '{name}' is method={method}: only {', '.join(COMPOSABLE)} runs compose (their control "
                "is an encoder at conv_in and their UNet change a rotation)"
            )
        if identity["backbone"] != identities[0]["backbone"]:
            raise ConfigError(
                f"run '{name}' was trained on backbone '{identity['backbone']}', run '{names[0]}' on "
                f"'{identities[0]['backbone']}': only runs on one backbone compose"
            )
        if run.resolution != runs[0].resolution:
            raise ConfigError(
                f"run '{name}' is at resolution {run.resolution}, run '{names[0]}' at {runs[0].resolution}"
            )
    layouts = {repr(identity["oft"]) for identity in identities if "oft" in identity}
    if len(layouts) > 1:
        raise ConfigError(
            "the runs' OFT layouts differ (oft/ targets or blocks): train them with one oft/ group"
        )
    conditions = [c for run in runs for c in split_condition(run.condition)]
    repeated = sorted({c for c in conditions if conditions.count(c) > 1})
    if repeated:
        raise ConfigError(
            f"condition(s) {repeated} come from more than one run: compose runs of distinct conditions"
        )


def run_encoders(run: TrainedRun) -> dict[str, nn.Module]:
    """A run's control encoders by condition name."""
    encoder = run.module.method.encoder
    if isinstance(encoder, MultiEncoder):
        return dict(encoder.encoders.items())
    return {run.condition: encoder}


def rotation_scales(runs: Sequence[TrainedRun], rotation_scale: Mapping[str, Any] | None) -> list[float]:
    """Each run's rotation scale from a mapping by the runs' conditions (`canny`, or `canny+seg` for a joint
    run); runs left out keep 1. Unknown names and values that are not finite numbers are refused."""
    given = dict(rotation_scale or {})
    conditions = [run.condition for run in runs]
    unknown = sorted(set(given) - set(conditions))
    if unknown:
        raise ConfigError(
            f"rotation_scale.{unknown[0]}: the composed runs' conditions are {conditions}; scale one of those"
        )
    scales = []
    for condition in conditions:
        value = given.get(condition, 1.0)
        try:
            scale = float(value)
        except (TypeError, ValueError):
            scale = math.nan
        if not math.isfinite(scale):
            raise ConfigError(
                f"rotation_scale.{condition}={value!r}: give a number (1: as trained, 0: the encoder only)"
            )
        scales.append(scale)
    return scales


def compose_runs(runs: Sequence[TrainedRun], rotation_scale: Mapping[str, Any] | None = None) -> Composition:
    """Compose runs (see the module docstring); the first rotating run's module carries the result.
    `rotation_scale` scales runs' rotations by condition name (`rotation_scales`)."""
    check_composable(runs)
    scales = rotation_scales(runs, rotation_scale)
    rotating = [i for i, run in enumerate(runs) if any(True for _ in oft_layers(run.module.unet))]
    carrier = runs[rotating[0] if rotating else 0].module
    layers = [dict(oft_layers(runs[i].module.unet)) for i in rotating]
    merge_composed(carrier.unet, layers, [scales[i] for i in rotating])
    encoders = {name: enc for run in runs for name, enc in run_encoders(run).items()}
    return Composition(carrier, MultiEncoder(encoders), runs[0].resolution, scales)

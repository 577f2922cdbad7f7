"""Hyperspherical-energy drift of the OFT-adapted layers, logged during training.

OFT's claim (Qiu et al. 2023, sec. 3) is that rotating a layer's input space leaves the hyperspherical
energy of its neurons unchanged. This callback measures it on the real run: for every adapted layer the
relative change `|HE(W R) - HE(W)| / HE(W)` (float precision with exact Cayley; small with Neumann), and
how far the rotations have moved from the identity, `||R - I||_F` per block.

Cheap by design: HE costs `out^2 * in` per layer (8.6 s for one 10240x1280 SD1.5 weight, about a minute
for the 144 adapted layers), so each layer is watched through a fixed random subset of `neurons` of its
neurons (`src.oft.energy.hyperspherical_energy_estimate`, cost `neurons^2 * in`, and only those rows of
`W R` are formed), every `every_n_steps` optimizer steps and after the first one. The drift of a fixed
subset's energy is exactly zero for an orthogonal `R`, as the full energy's is.

At every validation it also logs how far the rotations moved (`rotation_movement`, cheap: the skew blocks
only): `oft/q_norm_max` (largest `||Q||_F` of a block), `oft/q_over_radius_max` / `_mean` (`||Q||_F` over
the layer's COFT radius: 1 is the boundary), `oft/rotation_distance` / `_max` (`||R - I||_F` per block) and
`oft/plane_angle_max_deg` (the largest rotation angle of any plane, `2 atan(||Q||_2)`).
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from src.errors import ConfigError
from src.oft import hyperspherical_energy, oft_layers
from src.oft.energy import neuron_subset
from src.oft.layers import OFTLayer
from src.oft.rotation import rotate_weight, skew_frobenius_norm, skew_from_params


def rotated_rows(layer: OFTLayer, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(W R)[rows]`` (all rows when ``None``) as ``[len(rows), -1]``, and the blocks of ``R``."""
    weight = layer.base.weight.reshape(layer.base.weight.shape[0], -1)
    weight = weight if rows is None else weight[rows.to(weight.device)]
    rotation = layer.rotation()
    return rotate_weight(weight, rotation.to(weight.dtype)), rotation


def reference_energies(model: nn.Module, neurons: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """HE of every adapted layer's frozen weight (of its neuron subset when ``neurons`` names one)."""
    reference = {}
    for name, layer in oft_layers(model):
        weight = layer.base.weight.reshape(layer.base.weight.shape[0], -1)
        rows = None if neurons is None else neurons[name]
        reference[name] = hyperspherical_energy(weight if rows is None else weight[rows.to(weight.device)])
    return reference


@torch.no_grad()
def energy_drift(
    model: nn.Module, reference: dict[str, Tensor], neurons: dict[str, Tensor] | None = None
) -> dict[str, float]:
    """Max and mean relative HE drift over adapted layers, and mean per-block distance of R from I.

    ``reference`` holds each layer's HE before training, over the same neurons (``neurons[name]``, or
    all of them when ``neurons`` is ``None``): see :func:`reference_energies`.
    """
    drifts, distances = [], []
    for name, layer in oft_layers(model):
        rotated, rotation = rotated_rows(layer, None if neurons is None else neurons[name])
        energy = hyperspherical_energy(rotated)
        drifts.append(((energy - reference[name]).abs() / reference[name]).item())
        eye = torch.eye(rotation.shape[-1], dtype=rotation.dtype, device=rotation.device)
        distances.append((rotation - eye).flatten(1).norm(dim=1).mean().item())
    n = max(len(drifts), 1)
    return {
        "he_drift_max": max(drifts, default=0.0),
        "he_drift_mean": sum(drifts) / n,
        "rotation_distance": sum(distances) / n,
    }


@torch.no_grad()
def rotation_movement(model: nn.Module) -> dict[str, float]:
    """How far the rotations of `model`'s OFT layers moved from the identity ({} without any): the largest
    block `||Q||_F`, `||Q||_F` over the layer's COFT radius (max, mean; absent without COFT), `||R - I||_F`
    per block (mean, max) and the largest plane angle in degrees (`2 atan(||Q||_2)` of the Cayley map)."""
    norms, ratios, distances, angles = [], [], [], []
    for _, layer in oft_layers(model):
        q_norm = skew_frobenius_norm(layer.oft_skew.detach().float())
        norms.append(q_norm)
        if layer.coft_radius is not None:
            ratios.append(q_norm / layer.coft_radius)
        rotation = layer.rotation().detach().float()
        eye = torch.eye(rotation.shape[-1], dtype=rotation.dtype, device=rotation.device)
        distances.append((rotation - eye).flatten(1).norm(dim=1))
        skew = skew_from_params(layer.oft_skew.detach().float(), layer.block_size)
        angles.append(2 * torch.atan(torch.linalg.matrix_norm(skew, ord=2)))
    if not norms:
        return {}
    distance = torch.cat(distances)
    values = {
        "q_norm_max": torch.cat(norms).max().item(),
        "rotation_distance": distance.mean().item(),
        "rotation_distance_max": distance.max().item(),
        "plane_angle_max_deg": math.degrees(torch.cat(angles).max().item()),
    }
    if ratios:
        ratio = torch.cat(ratios)
        values |= {"q_over_radius_max": ratio.max().item(), "q_over_radius_mean": ratio.mean().item()}
    return values


class HypersphericalEnergyDrift(pl.Callback):
    """Logs `oft/he_drift_max`, `oft/he_drift_mean` and `oft/rotation_distance` after the first optimizer
    step and every `every_n_steps` steps, and the rotations' movement at every validation.

    Args:
        every_n_steps: optimizer steps between two measurements.
        neurons: neurons per layer in the fixed random subset the drift is measured on (layers with
            fewer are measured exactly); ``null`` measures every neuron (cost ``out^2 * in`` per layer).
        seed: seed of the subsets (the same subsets in every run and on every rank).
        module_attr: attribute of the LightningModule holding the adapted model.
    """

    def __init__(
        self, every_n_steps: int = 100, neurons: int | None = 256, seed: int = 0, module_attr: str = "unet"
    ) -> None:
        if every_n_steps < 1:
            raise ConfigError(f"every_n_steps {every_n_steps} must be >= 1")
        if neurons is not None and neurons < 2:
            raise ConfigError(f"neurons {neurons} must be >= 2 (a pair), or null for every neuron")
        self.every_n_steps, self.n_neurons, self.seed = every_n_steps, neurons, seed
        self.module_attr = module_attr
        self.neurons: dict[str, Tensor] | None = None
        self.reference: dict[str, Tensor] = {}
        self.last_logged_step = -1

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = getattr(pl_module, self.module_attr)
        if self.n_neurons is not None:
            generator = torch.Generator().manual_seed(self.seed)
            self.neurons = {
                name: neuron_subset(layer.base.weight.shape[0], self.n_neurons, generator)
                for name, layer in oft_layers(model)
            }
        self.reference = reference_energies(model, self.neurons)

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` is measured: the first, then every ``every_n_steps``-th, once."""
        return step != self.last_logged_step and (step == 1 or step % self.every_n_steps == 0)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if not self.reference:  # a method without rotations (method=lora, controlnet, ...): nothing to watch
            return
        if not self.due(trainer.global_step):  # once per optimizer step under gradient accumulation too
            return
        self.last_logged_step = trainer.global_step
        stats = energy_drift(getattr(pl_module, self.module_attr), self.reference, self.neurons)
        pl_module.log_dict({f"oft/{k}": v for k, v in stats.items()}, on_step=True, on_epoch=False)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The rotations' movement at every validation (`rotation_movement`; nothing without rotations)."""
        if trainer.sanity_checking:
            return
        movement = rotation_movement(getattr(pl_module, self.module_attr))
        if movement:
            pl_module.log_dict({f"oft/{k}": v for k, v in movement.items()}, on_step=False, on_epoch=True)

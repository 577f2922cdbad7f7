"""Hyperspherical-energy drift of the OFT-adapted layers, logged during training.

OFT's claim (Qiu et al. 2023, sec. 3) is that rotating a layer's input space leaves the hyperspherical
energy of its neurons unchanged. This callback measures it on the real run: for every adapted layer the
relative change `|HE(W R) - HE(W)| / HE(W)` (float precision with exact Cayley; small with Neumann), and
how far the rotations have moved from the identity, `||R - I||_F` per block.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from src.oft import hyperspherical_energy, oft_layers


def energy_drift(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max and mean relative HE drift over adapted layers, and mean per-block distance of R from I."""
    drifts, distances = [], []
    with torch.no_grad():
        for name, layer in oft_layers(model):
            energy = hyperspherical_energy(layer.rotated_weight())
            drifts.append(((energy - reference[name]).abs() / reference[name]).item())
            rotation = layer.rotation()
            eye = torch.eye(rotation.shape[-1], dtype=rotation.dtype, device=rotation.device)
            distances.append((rotation - eye).flatten(1).norm(dim=1).mean().item())
    n = max(len(drifts), 1)
    return {"he_drift_max": max(drifts, default=0.0), "he_drift_mean": sum(drifts) / n,
            "rotation_distance": sum(distances) / n}


class HypersphericalEnergyDrift(pl.Callback):
    """Logs `oft/he_drift_max`, `oft/he_drift_mean` and `oft/rotation_distance` every `every_n_steps`."""

    def __init__(self, every_n_steps: int = 100, module_attr: str = "unet") -> None:
        self.every_n_steps = every_n_steps
        self.module_attr = module_attr
        self.reference: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = getattr(pl_module, self.module_attr)
        self.reference = {name: hyperspherical_energy(layer.base.weight) for name, layer in oft_layers(model)}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        stats = energy_drift(getattr(pl_module, self.module_attr), self.reference)
        pl_module.log_dict({f"oft/{k}": v for k, v in stats.items()}, on_step=True, on_epoch=False)

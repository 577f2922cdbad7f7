"""Callbacks: sample grid layout and hyperspherical-energy drift on a real OFT model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from src.callbacks.energy import energy_drift
from src.grids import image_grid
from src.oft import OFTConfig, hyperspherical_energy, inject_oft, oft_layers, oft_parameters


def test_image_grid_rows_are_condition_generated_target():
    cond, gen, target = (torch.full((2, 3, 8, 8), v) for v in (0.0, 0.5, 1.0))
    grid = image_grid(cond, gen, target)
    assert grid.shape == (3, 2 * 8 + 3 * 2, 3 * 8 + 4 * 2)
    # first row: the three tiles hold 0, 0.5 and 1 after the 2-pixel padding
    assert grid[:, 2:10, 2:10].eq(0.0).all() and grid[:, 2:10, 12:20].eq(0.5).all()
    assert grid[:, 2:10, 22:30].eq(1.0).all()


@pytest.mark.parametrize("cayley,bound", [("exact", 1e-12), ("neumann", 1e-4)])
def test_energy_drift_is_zero_for_exact_cayley_and_small_for_neumann(cayley, bound):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8)).double()
    inject_oft(model, OFTConfig(block_size=8, cayley=cayley, target_modules=[r"\d"]))
    reference = {name: hyperspherical_energy(layer.base.weight) for name, layer in oft_layers(model)}
    assert energy_drift(model, reference) == {
        "he_drift_max": 0.0,
        "he_drift_mean": 0.0,
        "rotation_distance": 0.0,
    }
    with torch.no_grad():
        for p in oft_parameters(model):
            p.normal_(0, 0.05)
    stats = energy_drift(model, reference)
    assert stats["rotation_distance"] > 0.01
    assert stats["he_drift_max"] < bound
    # a non-orthogonal change of the weight does move the energy: the measurement can fail
    first = next(layer for _, layer in oft_layers(model))
    with torch.no_grad():
        first.base.weight[0] *= 3.0
        first.base.weight[1] = first.base.weight[2] * 0.9 + first.base.weight[1] * 0.1
    assert energy_drift(model, reference)["he_drift_max"] > 1e-3


def test_energy_drift_on_a_neuron_subset_is_zero_for_exact_cayley_and_catches_a_change():
    """The monitor's default: HE of a fixed random subset of neurons, with only those rows of W R formed."""
    from src.callbacks.energy import HypersphericalEnergyDrift, reference_energies

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 8)).double()
    inject_oft(model, OFTConfig(block_size=8, cayley="exact", target_modules=[r"\d"]))
    monitor = HypersphericalEnergyDrift(every_n_steps=3, neurons=10)
    module = nn.Module()
    module.unet = model
    monitor.on_fit_start(None, module)
    assert [len(v) for v in monitor.neurons.values()] == [10, 8]  # the 8-neuron layer: all of them
    assert monitor.reference == reference_energies(model, monitor.neurons)
    with torch.no_grad():
        for p in oft_parameters(model):
            p.normal_(0, 0.05)
    assert energy_drift(model, monitor.reference, monitor.neurons)["he_drift_max"] < 1e-12
    first = next(layer for _, layer in oft_layers(model))
    rows = monitor.neurons["0"]
    with torch.no_grad():
        first.base.weight[rows[0]] = first.base.weight[rows[1]] * 0.9 + first.base.weight[rows[0]] * 0.1
    assert energy_drift(model, monitor.reference, monitor.neurons)["he_drift_max"] > 1e-3
    assert [monitor.due(step) for step in range(1, 8)] == [True, False, True, False, False, True, False]
    monitor.last_logged_step = 6
    assert not monitor.due(6)  # gradient accumulation: several batch ends share one optimizer step


def test_validation_generations_are_drawn_once_and_shared(short_fit):
    """The sample grid and the controllability metric look at the same generations, sampled once per validation."""
    out, run, calls = short_fit.out, short_fit.run, short_fit.generate_steps
    assert calls == [2, 4]  # debug=default validates at steps 2 and 4
    assert len(list((out / "samples").glob("step_*.png"))) == 2
    assert "val/canny_f1" in run.trainer.callback_metrics


def test_progress_bar_has_no_negative_epoch_total():
    from types import SimpleNamespace

    from src.callbacks.progress import ProgressBar

    bar = ProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1)
    assert bar._get_train_description(14).strip() == "Epoch 14"
    bar._trainer = SimpleNamespace(max_epochs=20)
    assert bar._get_train_description(14).strip() == "Epoch 14/19"


def test_frozen_modules_note_replaces_lightnings_eval_mode_warning(config_factory, recwarn, caplog):
    import logging

    from src.train import build_run

    run = build_run(config_factory("debug=fdr", "~callbacks.samples", "~callbacks.controllability"))
    with caplog.at_level(logging.INFO, logger="src.callbacks.progress"):
        run.trainer.fit(run.module, datamodule=run.datamodule)
    assert not [w for w in recwarn if "in eval mode" in str(w.message)]
    notes = [r.getMessage() for r in caplog.records if "stay in eval mode on purpose" in r.getMessage()]
    assert len(notes) == 1 and "(text_encoder, unet, vae)" in notes[0]

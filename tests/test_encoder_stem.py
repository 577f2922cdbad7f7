"""`module.encoder_stem=unshuffle`: a run with the space-to-depth encoder trains, exports and loads as the
default encoder does, in our loader and in the ComfyUI node; the formats built on ControlNet's hint block
refuse it with one line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import make_trained_run

from src.export import export
from src.models.exported import load_control_encoder
from src.models.run import load_run

NODE = Path(__file__).resolve().parents[1] / "integrations/comfyui/oft_control/__init__.py"
STEM = ("module.encoder_stem=unshuffle", "module.encoder_channels=[8,8,12,12]")


@pytest.fixture(scope="module")
def unshuffled(tmp_path_factory):
    run = make_trained_run(tmp_path_factory.mktemp("stem") / "run", *STEM)
    return run, export(run, tmp_path_factory.mktemp("stem-export"), formats=["control_encoder"])


def test_the_exported_unshuffle_encoder_loads_equal_in_our_loader_and_the_comfyui_node(unshuffled):
    run_dir, folders = unshuffled
    ours = load_run(run_dir).module.encoder.eval()
    assert ours.arguments["stem"] == "unshuffle" and isinstance(ours.body[0], torch.nn.PixelUnshuffle)
    loaded, config = load_control_encoder(folders["control_encoder"])
    assert (config["stem"], config["channels"]) == ("unshuffle", [8, 8, 12, 12])
    spec = importlib.util.spec_from_file_location("oft_control_comfyui_stem", NODE)
    node = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(node)
    comfy = node.load_control_encoder(str(folders["control_encoder"]))
    condition = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        reference = ours(condition)
        assert reference.abs().max() > 0 and reference.shape == (2, 32, 8, 8)
        assert torch.equal(loaded(condition), reference)
        assert torch.equal(comfy(condition), reference)


@pytest.mark.parametrize("fmt", ["controlnet_xs", "hint_embedding"])
def test_hint_block_formats_refuse_the_unshuffle_stem_before_writing(unshuffled, tmp_path, fmt):
    run_dir, _ = unshuffled
    with pytest.raises(ValueError, match=f"{fmt}: holds ControlNet's hint encoder .* 'unshuffle' stem"):
        export(run_dir, tmp_path / "out", formats=[fmt])
    assert not (tmp_path / "out").exists()

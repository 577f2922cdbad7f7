"""The shipped toy backbone (loads with stock diffusers and draws what its captions say) and the
pretraining command that makes it (layout, manifest, resume)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from src import PROJECT_ROOT
from src.metrics import toy

TOY = PROJECT_ROOT / "assets" / "toy-sd"
LAYOUT = {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"}


def test_shipped_folder_has_the_sd15_layout_and_matches_its_manifest():
    assert {p.name for p in TOY.iterdir()} >= LAYOUT
    manifest = json.loads((TOY / "manifest.json").read_text())
    files = {
        p.relative_to(TOY).as_posix(): p for p in TOY.rglob("*") if p.is_file() and p.name != "manifest.json"
    }
    assert set(manifest["sha256"]) == set(files)
    for name, path in files.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == manifest["sha256"][name], name
    assert not [n for n in files if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]  # safetensors only
    assert sum(p.stat().st_size for p in files.values()) < 25 * 2**20
    assert {"recipe", "seed", "steps", "train_seconds", "commit", "figures"} <= set(manifest)


def test_stock_pipeline_draws_the_captions_colour_and_shape_above_chance():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(TOY, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    captions = toy.single_shape_captions(12)  # every (colour, shape) pair once
    generator = [torch.Generator().manual_seed(i) for i in range(len(captions))]
    out = pipe(captions, num_inference_steps=20, guidance_scale=7.5, generator=generator, output_type="np")
    images = [(image.clip(0, 1) * 255).round().astype("uint8") for image in out.images]
    own, chance = (
        toy.caption_fidelity(images, captions),
        toy.caption_fidelity(images, toy.shuffled(captions, 0)),
    )
    assert (
        own["dominant_colour_acc"] >= 0.6
        and own["dominant_colour_acc"] > chance["dominant_colour_acc"] + 0.25
    )
    assert own["shape_acc"] >= 0.4 and own["shape_acc"] > chance["shape_acc"]


def test_pretraining_writes_the_layout_and_resumes(tmp_path: Path):
    from src.pretrain import main

    out, work = tmp_path / "toy", tmp_path / "work"
    args = [
        "--out",
        str(out),
        "--work-dir",
        str(work),
        "--vae-steps",
        "2",
        "--unet-steps",
        "2",
        "--pool-size",
        "64",
        "--eval-captions",
        "2",
    ]
    manifest = main(args)
    assert {p.name for p in out.iterdir()} >= LAYOUT
    assert manifest["steps"] == {"vae": 2, "unet": 2} and manifest["recipe"]["seed"] == 0
    assert set(manifest["sha256"]) == {
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"
    }
    state = torch.load(work / "unet.pt", weights_only=True)
    assert state["step"] == 2
    first_vae = torch.load(work / "vae.pt", weights_only=True)["modules"]["vae"]
    main(
        [*args[:-6], "--unet-steps", "3", "--pool-size", "64", "--eval-captions", "2"]
    )  # resume: one more UNet step
    assert torch.load(work / "unet.pt", weights_only=True)["step"] == 3
    again_vae = torch.load(work / "vae.pt", weights_only=True)["modules"]["vae"]
    assert all(
        torch.equal(first_vae[k], again_vae[k]) for k in first_vae
    )  # the finished VAE stage is not rerun


@pytest.mark.parametrize("words", [("a", "red"), ()])
def test_tokenizer_round_trips_through_save_pretrained(tmp_path: Path, words):
    from transformers import CLIPTokenizer

    from src.models.tiny import build_tokenizer

    tokenizer = build_tokenizer(words, 16)
    tokenizer.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    text = "a red circle"
    assert loaded(text).input_ids == tokenizer(text).input_ids and loaded.model_max_length == 16

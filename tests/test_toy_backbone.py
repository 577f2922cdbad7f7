"""The shipped toy backbone (loads with stock diffusers and draws what its captions say) and the
pretraining command that makes it (layout, manifest, resume)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from src import PROJECT_ROOT
from src.toy import judge as toy

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


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_pretraining_writes_the_layout_resumes_and_refuses_another_recipe(tmp_path: Path):
    from src.errors import ConfigError
    from src.pretrain import main

    out, work = tmp_path / "toy", tmp_path / "work"
    tiny = ["--vae-steps", "2", "--unet-steps", "2", "--pool-size", "64", "--eval-captions", "2"]
    args = ["--out", str(out), "--work-dir", str(work), *tiny]
    manifest = main(args)
    assert {p.name for p in out.iterdir()} >= LAYOUT
    assert manifest["steps"] == {"vae": 2, "unet": 2} and manifest["recipe"]["seed"] == 0
    assert set(manifest["sha256"]) == {
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"
    }
    assert json.loads((work / "recipe.json").read_text()) == manifest["recipe"]
    first_vae = torch.load(work / "vae.pt", weights_only=True)["modules"]["vae"]

    with pytest.raises(ConfigError, match=r"--out .*toy is a model folder.*--force"):
        main(args)
    again = main([*args, "--force"])  # the same recipe resumes: both stages are done, nothing is retrained
    assert torch.load(work / "unet.pt", weights_only=True)["step"] == 2
    again_vae = torch.load(work / "vae.pt", weights_only=True)["modules"]["vae"]
    assert all(torch.equal(first_vae[k], again_vae[k]) for k in first_vae)
    assert again["sha256"] == manifest["sha256"]  # and writes the same bytes

    before = _digests(work)
    for changed, field in (
        (["--unet-steps", "3"], r"unet\.steps 2 -> 3"),
        (["--freeze-text-encoder"], r"unet\.train_text_encoder True -> False"),
    ):
        with pytest.raises(ConfigError, match=rf"--work-dir .* another recipe \({field}\)"):
            main([*args, "--force", *changed])
    assert _digests(work) == before


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], r"--out is required: name a new folder"),
        (
            ["--out", "assets/toy-sd"],
            r"--out assets/toy-sd is a model folder: name a new folder, or pass --force",
        ),
    ],
)
def test_pretrain_never_touches_the_shipped_backbone_without_force(tmp_path: Path, extra, message):
    from helpers import run_module

    before = _digests(TOY)
    result = run_module("src.pretrain", "--work-dir", str(tmp_path / "work"), *extra, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), result.stderr
    assert _digests(TOY) == before and not (tmp_path / "work").exists()


def test_a_work_dir_with_state_but_no_recipe_stamp_is_refused(tmp_path: Path):
    from src.errors import ConfigError
    from src.toy.pretrain import ToyRecipe, stamp_work_dir

    (tmp_path / "unet.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"holds training state \(unet\.pt\) without a recipe\.json"):
        stamp_work_dir(tmp_path, ToyRecipe())


@pytest.mark.parametrize("words", [("a", "red"), ()])
def test_tokenizer_round_trips_through_save_pretrained(tmp_path: Path, words):
    from transformers import CLIPTokenizer

    from src.models.tiny import build_tokenizer

    tokenizer = build_tokenizer(words, 16)
    tokenizer.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    text = "a red circle"
    assert loaded(text).input_ids == tokenizer(text).input_ids and loaded.model_max_length == 16

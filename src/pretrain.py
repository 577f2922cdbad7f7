"""Pretrain the toy backbone: ``python -m src.pretrain --out DIR [--work-dir outputs/pretrain] [--force]``.

Trains the VAE, then the UNet and text encoder on the toy world (``src.toy.pretrain``), seeded, with
progress bars; an interrupted run resumes from ``--work-dir``, which is stamped with the recipe: a resume
under another recipe is refused, naming the fields that differ. ``--out`` is required and an existing
folder is replaced only with ``--force`` (the shipped ``assets/toy-sd`` included). Writes a diffusers folder with SD1.5's
layout (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, all
weights in safetensors) and ``manifest.json``: the full recipe, seed, steps, wall time, the commit it was
trained at, the sha256 of every file and the quality figures (``src.toy.judge``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import torch

from src.errors import run_cli
from src.locks import FolderLock
from src.machine import cpu_model
from src.toy.pretrain import ToyRecipe, check_out, file_digests, pretrain, recipe_dict, stamp_work_dir

ROOT = Path(__file__).resolve().parent.parent


def _commit() -> str:
    """The commit the weights are trained at (with ``-dirty`` if the tree had uncommitted changes)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m src.pretrain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = ToyRecipe()
    parser.add_argument("--out", default=None, help="the diffusers folder to write (required)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument(
        "--work-dir", default="outputs/pretrain", help="resumable training state, stamped with the recipe"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--vae-steps", type=int, default=defaults.vae.steps)
    parser.add_argument("--unet-steps", type=int, default=defaults.unet.steps)
    parser.add_argument(
        "--pool-size", type=int, default=defaults.unet.pool_size, help="scenes in the latent pool"
    )
    parser.add_argument("--freeze-text-encoder", action="store_true", help="train the UNet only")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    parser.add_argument("--eval-captions", type=int, default=48, help="single-shape captions to judge")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Entry point; returns the manifest. Every refusal (--out, --work-dir) comes before any training."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = ToyRecipe(seed=args.seed)
    recipe = replace(
        recipe,
        vae=replace(recipe.vae, steps=args.vae_steps),
        unet=replace(
            recipe.unet,
            steps=args.unet_steps,
            pool_size=args.pool_size,
            train_text_encoder=not args.freeze_text_encoder,
        ),
    )
    out, work_dir = check_out(args.out, args.force), Path(args.work_dir)
    stamp_work_dir(work_dir, recipe)
    began, commit = time.time(), _commit()
    with FolderLock(work_dir, "pretraining the toy backbone"):
        pipe, figures = pretrain(recipe, work_dir)
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging, safe_serialization=True)
    from src.toy.judge import backbone_fidelity

    figures |= backbone_fidelity(staging, count=args.eval_captions, seed=recipe.seed + 3)
    manifest = {
        "recipe": recipe_dict(recipe),
        "seed": recipe.seed,
        "steps": {"vae": recipe.vae.steps, "unet": recipe.unet.steps},
        "train_seconds": round(figures.pop("vae_seconds") + figures.pop("unet_seconds"), 1),
        "wall_seconds_this_invocation": round(time.time() - began, 1),
        "threads": args.threads,
        "cpu": cpu_model(),
        "commit": commit,
        "torch": torch.__version__,
        "figures": figures,
        "sha256": file_digests(staging),
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    print(json.dumps(figures, indent=1))
    return manifest


if __name__ == "__main__":
    run_cli(main)

"""Pretraining of the toy backbone: a tiny Stable-Diffusion-format model of the toy world.

Two stages, each a plain loop over freshly drawn scenes (``src.toy.world``; batch ``b`` of step
``s`` is scenes ``s*b .. s*b + b - 1``, so a resumed stage sees exactly the data it would have seen):

1. **VAE** (``AutoencoderKL``, factor 8): L1 + MSE reconstruction plus a small KL term. Afterwards the
   latent scaling factor is set to ``1 / std`` of the latents, as SD's 0.18215 was chosen.
2. **UNet + text encoder** (``UNet2DConditionModel`` with SD1.5's module names, a 2-layer CLIP text
   encoder, trained jointly): epsilon prediction with min-SNR-gamma loss weights (Hang et al. 2023),
   uniform timesteps, captions dropped to "" with a small probability (so classifier-free guidance works),
   and an exponential moving average of the weights, which is what is saved.

Every ``save_every`` steps the stage's state is written atomically to ``work_dir`` and a rerun resumes
from it. The result is a diffusers folder with SD1.5's layout plus ``manifest.json``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from src.errors import ConfigError
from src.fileio import atomic_path
from src.toy.backbone import build_toy_pipeline
from src.toy.world import render, scene_at


@dataclass
class VaeStage:
    """Autoencoder training settings."""

    steps: int = 1500
    batch_size: int = 16
    lr: float = 1.5e-3
    kl_weight: float = 1e-6


@dataclass
class UnetStage:
    """Denoiser (+ text encoder) training settings."""

    steps: int = 5000
    batch_size: int = 64
    pool_size: int = 16384
    lr: float = 1e-3
    text_lr: float = 1e-3
    train_text_encoder: bool = True
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    ema_decay: float = 0.999


@dataclass
class ToyRecipe:
    """Everything that decides the pretrained weights (written into the manifest)."""

    seed: int = 0
    resolution: int = 64
    two_fraction: float = 0.5
    warmup_steps: int = 100
    save_every: int = 250
    vae: VaeStage = field(default_factory=VaeStage)
    unet: UnetStage = field(default_factory=UnetStage)


def scene_batch(seed: int, start: int, count: int, resolution: int, two_fraction: float):
    """Images in [-1, 1] as [count, 3, R, R] and the captions of scenes ``start .. start + count - 1``."""
    images, captions = [], []
    for index in range(start, start + count):
        scene = scene_at(seed, index, two_fraction)
        images.append(render(scene, resolution)[0])
        captions.append(scene.caption)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixels, captions


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to 10% of the peak."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class _Stage:
    """Resumable optimisation state of one stage: modules, optimizer, schedule, EMA, step."""

    def __init__(
        self,
        name: str,
        work_dir: Path,
        modules: dict[str, nn.Module],
        params,
        steps: int,
        warmup: int,
        ema: dict[str, nn.Module] | None = None,
    ):
        self.name, self.path, self.modules, self.ema = name, work_dir / f"{name}.pt", modules, ema or {}
        self.optimizer = torch.optim.AdamW(params, weight_decay=0.0)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(warmup, steps))
        self.step, self.seconds = 0, 0.0
        if self.path.is_file():
            self._load()

    def state(self) -> dict:
        return {
            "step": self.step,
            "seconds": self.seconds,
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "ema": {k: m.state_dict() for k, m in self.ema.items()},
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
        }

    def _load(self) -> None:
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        for key, module in self.modules.items():
            module.load_state_dict(state["modules"][key])
        for key, module in self.ema.items():
            module.load_state_dict(state["ema"][key])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.step, self.seconds = int(state["step"]), float(state["seconds"])

    def save(self) -> None:
        with atomic_path(self.path) as tmp:
            torch.save(self.state(), tmp)

    def update(self, loss: torch.Tensor, decay: float = 0.0) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        self.optimizer.step()
        self.schedule.step()
        with torch.no_grad():
            for key, shadow in self.ema.items():
                for target, source in zip(shadow.parameters(), self.modules[key].parameters(), strict=True):
                    target.lerp_(source, 1.0 - decay)
        self.step += 1


def _run(stage: _Stage, total: int, save_every: int, step_fn: Callable[[int], dict[str, float]]) -> None:
    """Run ``step_fn(step)`` until ``total`` steps, with a progress bar and periodic resumable saves."""
    bar = tqdm(total=total, initial=stage.step, desc=stage.name, dynamic_ncols=True, mininterval=5)
    while stage.step < total:
        began = time.perf_counter()
        logs = step_fn(stage.step)
        stage.seconds += time.perf_counter() - began
        bar.update(1)
        bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()}, refresh=False)
        if stage.step % save_every == 0 or stage.step == total:
            stage.save()
    bar.close()


def train_vae(vae: nn.Module, recipe: ToyRecipe, work_dir: Path) -> _Stage:
    """Stage 1: fit the autoencoder to toy scenes."""
    cfg = recipe.vae
    groups = [{"params": list(vae.parameters()), "lr": cfg.lr}]
    stage = _Stage("vae", work_dir, {"vae": vae}, groups, cfg.steps, recipe.warmup_steps)
    vae.train()

    def step(index: int) -> dict[str, float]:
        pixels, _ = scene_batch(
            recipe.seed, index * cfg.batch_size, cfg.batch_size, recipe.resolution, recipe.two_fraction
        )
        generator = torch.Generator().manual_seed(recipe.seed * 1_000_003 + index)
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(latents).sample
        rec = F.l1_loss(recon, pixels) + F.mse_loss(recon, pixels)
        kl = posterior.kl().mean() / pixels[0].numel()
        stage.update(rec + cfg.kl_weight * kl)
        return {"rec": rec.item()}

    _run(stage, cfg.steps, recipe.save_every, step)
    vae.eval()
    return stage


@torch.no_grad()
def vae_psnr(vae: nn.Module, recipe: ToyRecipe, count: int = 64) -> float:
    """PSNR (dB, images in [0, 1]) of mean-latent reconstructions of held-out scenes."""
    pixels, _ = scene_batch(recipe.seed + 1, 0, count, recipe.resolution, recipe.two_fraction)
    recon = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    mse = F.mse_loss((recon + 1) / 2, (pixels + 1) / 2).item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


@torch.no_grad()
def latent_scaling_factor(vae: nn.Module, recipe: ToyRecipe, count: int = 512) -> float:
    """``1 / std`` of sampled latents over held-out scenes, so scaled latents have unit variance."""
    pixels, _ = scene_batch(recipe.seed + 2, 0, count, recipe.resolution, recipe.two_fraction)
    latents = torch.cat([vae.encode(chunk).latent_dist.sample() for chunk in pixels.split(64)])
    return float(1.0 / latents.std())


def _min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR(t), gamma) / SNR(t) for epsilon prediction (Hang et al., "Efficient Diffusion Training via
    Min-SNR Weighting Strategy", 2023)."""
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1.0 - alphas)
    return torch.clamp(snr, max=gamma) / snr


def encode_prompts(tokenizer, text_encoder: nn.Module, captions: list[str]) -> torch.Tensor:
    """Per-token hidden states of the text encoder, padded to the tokenizer's max length."""
    ids = tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return text_encoder(ids)[0]


@torch.no_grad()
def _latent_pool(vae: nn.Module, recipe: ToyRecipe):
    """Scaled posterior mean and std of ``pool_size`` scenes unseen by the VAE stage, with their captions."""
    vae.requires_grad_(False)
    means, stds, captions = [], [], []
    for start in tqdm(range(0, recipe.unet.pool_size, 256), desc="latent pool", mininterval=5):
        count = min(256, recipe.unet.pool_size - start)
        pixels, texts = scene_batch(
            recipe.seed, 10_000_000 + start, count, recipe.resolution, recipe.two_fraction
        )
        posterior = vae.encode(pixels).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        captions += texts
    scale = vae.config.scaling_factor
    return torch.cat(means) * scale, torch.cat(stds) * scale, captions


def train_unet(
    parts: dict[str, nn.Module], tokenizer, scheduler, recipe: ToyRecipe, work_dir: Path
) -> _Stage:
    """Stage 2: fit the denoiser (and the text encoder) on VAE latents of toy scenes; EMA kept."""
    cfg = recipe.unet
    unet, text_encoder, vae = parts["unet"], parts["text_encoder"], parts["vae"]
    trained = {"unet": unet, "text_encoder": text_encoder} if cfg.train_text_encoder else {"unet": unet}
    groups = [{"params": list(unet.parameters()), "lr": cfg.lr}]
    if cfg.train_text_encoder:
        groups.append({"params": list(text_encoder.parameters()), "lr": cfg.text_lr})
    else:
        text_encoder.requires_grad_(False)
    ema = {k: copy.deepcopy(m).requires_grad_(False) for k, m in trained.items()}
    stage = _Stage("unet", work_dir, trained, groups, cfg.steps, recipe.warmup_steps, ema)
    mean, std, pool_captions = _latent_pool(vae, recipe)
    for module in trained.values():
        module.train()

    def step(index: int) -> dict[str, float]:
        generator = torch.Generator().manual_seed(recipe.seed * 1_000_003 + 7 + index)
        picks = torch.randint(0, cfg.pool_size, (cfg.batch_size,), generator=generator)
        drop = torch.rand(cfg.batch_size, generator=generator) < cfg.caption_dropout
        captions = ["" if d else pool_captions[i] for i, d in zip(picks.tolist(), drop.tolist(), strict=True)]
        latents = mean[picks] + std[picks] * torch.randn(mean[picks].shape, generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (len(captions),), generator=generator
        )
        noisy = scheduler.add_noise(latents, noise, timesteps)
        hidden = encode_prompts(tokenizer, text_encoder, captions)
        pred = unet(noisy, timesteps, encoder_hidden_states=hidden).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * _min_snr_weights(scheduler, timesteps, cfg.snr_gamma)).mean()
        warm = min(cfg.ema_decay, (1 + stage.step) / (10 + stage.step))
        stage.update(loss, decay=warm)
        return {"loss": loss.item()}

    _run(stage, cfg.steps, recipe.save_every, step)
    return stage


def recipe_dict(recipe: ToyRecipe) -> dict:
    """The recipe as plain data, for the manifest."""
    return asdict(recipe)


def pretrain(recipe: ToyRecipe, work_dir: Path):
    """Both stages, resumed from ``work_dir`` where possible; returns the pipeline (EMA weights) and figures."""
    work_dir.mkdir(parents=True, exist_ok=True)
    pipe = build_toy_pipeline(recipe.seed)
    vae_stage = train_vae(pipe.vae, recipe, work_dir)
    pipe.vae.register_to_config(scaling_factor=latent_scaling_factor(pipe.vae, recipe))
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "vae": pipe.vae}
    unet_stage = train_unet(parts, pipe.tokenizer, pipe.scheduler, recipe, work_dir)
    for key, shadow in unet_stage.ema.items():
        getattr(pipe, key).load_state_dict(shadow.state_dict())
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval().requires_grad_(False)
    # A fast tokenizer saves the padding/truncation its last call set; make that the training's setting
    # whether or not this process ran the UNet stage, so a resumed run writes the same tokenizer.json.
    encode_prompts(pipe.tokenizer, pipe.text_encoder, [""])
    figures = {
        "vae_psnr_db": round(vae_psnr(pipe.vae, recipe), 2),
        "vae_scaling_factor": pipe.vae.config.scaling_factor,
        "vae_seconds": round(vae_stage.seconds, 1),
        "unet_seconds": round(unet_stage.seconds, 1),
    }
    return pipe, figures


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` except the manifest, by relative path."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != "manifest.json"
    }


# ------------------------------------------------------------------------------------- guards
RECIPE_STAMP = "recipe.json"


def flatten(data: dict, prefix: str = "") -> dict[str, object]:
    """``{"unet": {"steps": 5}}`` -> ``{"unet.steps": 5}``."""
    flat: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def recipe_differences(stamped: dict, wanted: dict) -> list[str]:
    """``field stamped -> wanted`` for every field where two recipes differ."""
    old, new = flatten(stamped), flatten(wanted)
    return [
        f"{k} {old.get(k, '(absent)')} -> {new.get(k, '(absent)')}"
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    ]


def stamp_work_dir(work_dir: Path, recipe: ToyRecipe) -> None:
    """Tie ``work_dir`` to ``recipe``: write the stamp on first use; refuse a resume under another recipe.

    A work dir's saved stages are only a resume of the recipe that wrote them: continuing them under
    another step count or another text-encoder setting would mix two recipes in one model (or fail on a
    mismatched optimizer state), while the manifest would claim the new recipe.
    """
    wanted = recipe_dict(recipe)
    stamp = work_dir / RECIPE_STAMP
    if stamp.is_file():
        try:
            stamped = json.loads(stamp.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"--work-dir {work_dir}: unreadable {RECIPE_STAMP} ({error}); pass a new --work-dir"
            ) from error
        differences = recipe_differences(stamped, wanted)
        if differences:
            raise ConfigError(
                f"--work-dir {work_dir} holds a pretraining of another recipe ({'; '.join(differences)}): "
                "pass a new --work-dir, or the same options as before to resume it"
            )
        return
    saved = sorted(p.name for p in work_dir.glob("*.pt")) if work_dir.is_dir() else []
    if saved:
        raise ConfigError(
            f"--work-dir {work_dir} holds training state ({', '.join(saved)}) without a {RECIPE_STAMP}, so "
            "its recipe is unknown: pass a new --work-dir"
        )
    work_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(stamp) as tmp:
        Path(tmp).write_text(json.dumps(wanted, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def check_out(out: str | None, force: bool) -> Path:
    """The folder the model will be written to; refused before any training if that would destroy something."""
    if not out:
        raise ConfigError(
            "--out is required: name a new folder for the pretrained backbone (e.g. --out outputs/toy-sd); "
            "the shipped assets/toy-sd is replaced only with --out assets/toy-sd --force"
        )
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} is a file: name a folder")
    if path.is_dir() and any(path.iterdir()) and not force:
        what = "a model folder" if (path / "model_index.json").is_file() else "a non-empty folder"
        raise ConfigError(f"--out {path} is {what}: name a new folder, or pass --force to replace it")
    return path

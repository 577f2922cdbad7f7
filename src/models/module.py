"""The Lightning module: a frozen SD backbone and what a method trains on it (by default OFT rotations in its
UNet and a control encoder; `src.models.methods` for the others)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from src.errors import CheckpointError, ConfigError
from src.models import xl
from src.models.backbone import BackboneSpec, load_backbone
from src.models.checkpoint import CHECKPOINT_META, check_identity, checkpoint_identity
from src.models.latents import LatentCache, sample_latents
from src.models.memory import MemoryOptions, apply_memory_options
from src.models.methods import Method, OFTControl
from src.models.multi import condition_keep, split_condition
from src.models.reward import ConsistencyReward, clean_estimate
from src.models.sampling import SamplingOptions, build_pipeline, make_scheduler, sample_controlled
from src.oft import OFTConfig

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


def check_schedule_length(lr_scheduler: Any) -> None:
    """A scheduler config whose length is a number of steps (``T_max``, ``total_iters``) must have one: the
    demo ties it to ``trainer.max_steps``, which an epoch-based run leaves null or -1."""
    for key in ("T_max", "total_iters"):
        value = lr_scheduler.get(key, 1) if lr_scheduler is not None else 1
        if value is None or (isinstance(value, int) and value < 1):
            raise ConfigError(
                f"lr_scheduler.{key} is {value} (it follows trainer.max_steps): set trainer.max_steps, "
                f"lr_scheduler.{key}=<steps>, or lr_scheduler=null for a constant lr"
            )


class OFTControlModule(pl.LightningModule):
    """Trains a method's parts on a frozen text-to-image UNet: by default a control encoder and OFT rotations.

    Args:
        backbone: where the frozen SD components come from.
        oft: which UNet layers get orthogonal rotations, and how (LoRA adapts the same layers).
        optimizer: a factory (Hydra `_partial_`) called with the trainable parameters only: as the named
            parameter groups of the method (`encoder` and `adapter`, the latter at `method.adapter_lr`)
            when the method has an `adapter_lr`, else as one group.
        lr_scheduler: an optional factory called with the optimizer; stepped every training step.
        encoder_channels: stage widths of the control encoder (methods that use it).
        encoder_stem: `conv` (ControlNet's hint encoder: stride-2 convolutions from the full-resolution
            condition) or `unshuffle` (space-to-depth to the latent resolution first, then convolutions there).
        caption_dropout: probability of replacing a caption by "" (ControlNet uses 0.5).
        timestep_sampling: `uniform` (the paper's) or `cubic` (T2I-Adapter's bias to noisy steps).
        sampling: how validation samples are drawn (the `sampling/` config group).
        max_consecutive_nonfinite: stop the run after this many non-finite losses in a row (each one
            skips its optimizer step and is counted in `train/nonfinite_steps`).
        memory: memory/speed switches for the frozen UNet (gradient checkpointing, channels-last,
            torch.compile); all off by default. Channels-last also applies to the method's own networks,
            and gradient checkpointing to those that support diffusers' switch (ControlNet's copy).
        condition: the task's condition (`task.condition`), recorded in the checkpoint identity so a
            checkpoint is never loaded for another task; `src.train` and `src.models.run` pass it.
        method: what is trained and how the control enters the UNet (the `method/` config group;
            default OFT-Control), recorded in the checkpoint identity.
        latent_cache_mb: keep the frozen VAE's posterior of each distinct training image, up to this many
            megabytes, so a CPU run does not re-encode an image it has seen (`src.models.latents`; 0: off).
        condition_dropout: with several conditions (`task.condition: canny+seg`), the probability that
            training drops each condition of each sample (its embedding left out), so that any subset of
            the conditions works at inference (`src.models.multi`); a condition missing from a sample is
            dropped too. Unused with one condition.
        consistency: an optional consistency reward on canny edges (`src.models.reward`, ControlNet++'s idea):
            off while its weight is 0.
    """

    def __init__(
        self,
        backbone: BackboneSpec,
        oft: OFTConfig,
        optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        encoder_channels: Sequence[int] = (16, 32, 96, 256),
        caption_dropout: float = 0.5,
        sampling: SamplingOptions | None = None,
        max_consecutive_nonfinite: int = 5,
        memory: MemoryOptions | None = None,
        timestep_sampling: str = "uniform",
        condition: str | None = None,
        method: Method | None = None,
        latent_cache_mb: float = 0.0,
        condition_dropout: float = 0.0,
        encoder_stem: str = "conv",
        consistency: ConsistencyReward | None = None,
    ) -> None:
        super().__init__()
        self.condition = condition
        if not 0.0 <= condition_dropout < 1.0:
            raise ConfigError(f"module.condition_dropout {condition_dropout} is not a probability in [0, 1)")
        self.condition_names, self.condition_dropout = split_condition(condition), condition_dropout
        self.latent_cache = LatentCache(latent_cache_mb)
        if not 0.0 <= caption_dropout <= 1.0:
            raise ConfigError(f"caption_dropout {caption_dropout} is not a probability in [0, 1]")
        if timestep_sampling not in ("uniform", "cubic"):
            raise ConfigError(f"module.timestep_sampling '{timestep_sampling}' is not one of: uniform, cubic")
        self.timestep_sampling = timestep_sampling
        self.backbone_spec, self.oft_config = backbone, oft
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.caption_dropout = caption_dropout
        self.sampling = sampling or SamplingOptions()
        parts = load_backbone(backbone)
        self.unet, self.vae, self.text_encoder = parts.unet, parts.vae, parts.text_encoder
        self.tokenizer, self.noise_scheduler = parts.tokenizer, parts.noise_scheduler
        self.text_encoder_2, self.tokenizer_2 = parts.text_encoder_2, parts.tokenizer_2  # SDXL only
        self.vae_scale_factor = parts.vae_scale_factor
        self.consistency = consistency or ConsistencyReward()
        self.consistency.check(condition, self.noise_scheduler.config.num_train_timesteps)
        self.encoder_channels, self.encoder_stem = list(encoder_channels), encoder_stem
        self.method = method or OFTControl()
        self.adapted_layers = self.method.build(self)  # registers the method's parts as submodules
        self.memory = memory or MemoryOptions()
        parts_of_method = list(self.method.parts.values())
        apply_memory_options(self.memory, self.unet, [self.vae, *parts_of_method])
        for part in parts_of_method:  # ControlNet's copy supports diffusers' checkpointing too
            if self.memory.gradient_checkpointing and getattr(
                part, "_supports_gradient_checkpointing", False
            ):
                part.enable_gradient_checkpointing()
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.nonfinite_steps, self.consecutive_nonfinite = 0, 0
        self.strict_loading = False  # checkpoints hold only the trained tensors; see on_load_checkpoint

    # ----------------------------------------------------------------------------------- parameters
    def trainable_names(self) -> list[str]:
        """Qualified names of the trained tensors (e.g. the control encoder and the OFT rotations)."""
        return [name for name, p in self.named_parameters() if p.requires_grad]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_summary(self) -> dict[str, int]:
        """Trained parameters by group (`encoder_params`, `adapter_params`; `oft_dof` for the rotations)."""
        return self.method.parameter_summary()

    def train(self, mode: bool = True) -> OFTControlModule:
        """Keep the frozen VAE and text encoders in eval mode whatever Lightning asks of the module."""
        super().train(mode)
        for frozen in (self.vae, self.text_encoder, self.text_encoder_2):
            if frozen is not None:
                frozen.eval()
        return self

    # ----------------------------------------------------------------------------------- diffusion
    @torch.no_grad()
    def encode_prompts(self, captions: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return self.text_encoder(tokens.input_ids.to(self.device))[0]

    def text_conditioning(
        self, captions: Sequence[str], size: Sequence[int]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """`(encoder_hidden_states, extra UNet keywords)` for captions of `size = (H, W)` pixel images: SD's text
        embeddings alone; for SDXL both encoders' and `added_cond_kwargs` (pooled text, size/crop ids)."""
        if self.text_encoder_2 is None:
            return self.encode_prompts(captions), {}
        tokenizers, encoders = (self.tokenizer, self.tokenizer_2), (self.text_encoder, self.text_encoder_2)
        hidden, pooled = xl.encode_prompts(tokenizers, encoders, captions, self.device)
        return hidden, {"added_cond_kwargs": xl.added_conditions(pooled, *size)}

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled VAE latents (an SDXL VAE that overflows in fp16 encodes in fp32)."""
        if self.text_encoder_2 is not None and xl.needs_fp32_vae(self.vae):
            with torch.autocast(self.device.type, enabled=False):
                latents = self.vae.float().encode(images.float()).latent_dist.sample()
            return latents * self.vae.config.scaling_factor
        images = images.to(self.vae.dtype)
        if self.latent_cache.applies(images):
            latents = sample_latents(*self.latent_cache.posterior(images, self._posterior))
        else:
            latents = self.vae.encode(images).latent_dist.sample()
        return latents * self.vae.config.scaling_factor

    def _posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(images).latent_dist
        return dist.mean, dist.std

    def drop_captions(self, captions: Sequence[str]) -> list[str]:
        keep = torch.rand(len(captions)) >= self.caption_dropout
        return [c if k else "" for c, k in zip(captions, keep.tolist(), strict=False)]

    def diffusion_loss(
        self,
        batch: dict[str, Any],
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        captions: Sequence[str] | None = None,
        strength: Any = None,
    ) -> torch.Tensor:
        """MSE between the UNet's prediction, with the method's control, and the scheduler's target (epsilon or
        v), at `timesteps` or ones drawn by `sample_timesteps` (the rule `timestep_sampling` names).

        `strength` scales the control (per condition with several: `[B, k]`); by default 1, or with several
        conditions the batch's `present` mask."""
        prediction, target, _, _ = self.predict(batch, noise, timesteps, captions, strength)
        return F.mse_loss(prediction.float(), target.float())

    def predict(
        self,
        batch: dict[str, Any],
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        captions: Sequence[str] | None = None,
        strength: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(prediction, target, noisy latents, timesteps)` of one controlled UNet pass (see `diffusion_loss`)."""
        latents = self.encode_images(batch["image"])
        noise = torch.randn_like(latents) if noise is None else noise
        if timesteps is None:
            timesteps = self.sample_timesteps(latents.shape[0], latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        size = batch["image"].shape[-2:]
        text, extra = self.text_conditioning(batch["caption"] if captions is None else captions, size)
        if strength is None:
            strength = self.condition_strengths(batch, dropout=0.0)
        with self.method.inject(self.unet, batch["condition"].to(latents.dtype), strength):
            prediction = self.unet(noisy, timesteps, encoder_hidden_states=text, **extra).sample
        return prediction, self.diffusion_target(latents, noise, timesteps), noisy, timesteps

    def rewarded_loss(
        self, batch: dict[str, Any], captions: Sequence[str], strength: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(diffusion loss, consistency loss)`: the first `consistency.rewarded(B)` samples get a low-noise
        timestep, and their decoded one-step estimate is scored against their edge maps (`src.models.reward`)."""
        count, reward = len(batch["caption"]), self.consistency
        timesteps = self.sample_timesteps(count, self.device)
        k = reward.rewarded(count)
        timesteps[:k] = torch.randint(0, reward.max_timestep, (k,), device=self.device)
        prediction, target, noisy, timesteps = self.predict(batch, None, timesteps, captions, strength)
        diffusion = F.mse_loss(prediction.float(), target.float())
        clean = clean_estimate(self.noise_scheduler, noisy[:k].float(), prediction[:k].float(), timesteps[:k])
        images = self.vae.decode((clean / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
        return diffusion, reward.loss(images.float(), batch["condition"][:k, 0].float())

    def sample_timesteps(self, count: int, device: torch.device) -> torch.Tensor:
        """Training timesteps: uniform (the paper's), or `cubic`, `t = (1 - u^3) T` for uniform `u`, which
        favours the noisy steps where the layout of an image is decided (T2I-Adapter, Mou et al. 2023)."""
        total = self.noise_scheduler.config.num_train_timesteps
        if self.timestep_sampling == "uniform":
            return torch.randint(0, total, (count,), device=device)
        u = torch.rand(count, device=device)
        return ((1 - u**3) * total).long().clamp(0, total - 1)

    def diffusion_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        raise ConfigError(f"prediction_type '{kind}' is not supported; use epsilon or v_prediction")

    # ----------------------------------------------------------------------------------- lightning
    def condition_strengths(self, batch: dict[str, Any], dropout: float) -> Any:
        """1 with one condition; with several, `[B, k]`: present in the sample and not dropped (`dropout`)."""
        if len(self.condition_names) < 2:
            return 1.0
        count = len(batch["caption"])
        present = batch.get("present")
        return condition_keep(present, count, len(self.condition_names), dropout, self.device)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        strength = self.condition_strengths(batch, self.condition_dropout)
        captions, count = self.drop_captions(batch["caption"]), len(batch["caption"])
        if self.consistency.enabled:
            loss, consistency = self.rewarded_loss(batch, captions, strength)
            self.log("train/consistency", consistency, batch_size=self.consistency.rewarded(count))
            loss = loss + self.consistency.weight * consistency
        else:
            loss = self.diffusion_loss(batch, captions=captions, strength=strength)
        if not self.loss_is_finite(loss):
            return None  # no backward: the optimizer step finds no gradients and changes nothing
        self.log("train/loss", loss, prog_bar=True, batch_size=count)
        return loss

    def loss_is_finite(self, loss: torch.Tensor) -> bool:
        """Count non-finite losses (agreed across ranks, so all skip together); stop after too many in a row."""
        finite = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True)
        self.consecutive_nonfinite = 0 if finite else self.consecutive_nonfinite + 1
        self.nonfinite_steps += 0 if finite else 1
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), batch_size=1)
        if self.consecutive_nonfinite >= self.max_consecutive_nonfinite:
            raise FloatingPointError(
                f"{self.consecutive_nonfinite} non-finite losses in a row (limit "
                f"module.max_consecutive_nonfinite={self.max_consecutive_nonfinite}): lower optim.lr, check the "
                "data for corrupt images, or resume from the last checkpoint, which holds only finite weights"
            )
        return finite

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Loss with noise and timesteps fixed per batch index, so validation curves are comparable."""
        generator = torch.Generator().manual_seed(self.sampling.seed + batch_idx)
        height, width = (size // self.vae_scale_factor for size in batch["image"].shape[-2:])
        latent_shape = (len(batch["caption"]), self.unet.config.in_channels, height, width)
        noise = torch.randn(latent_shape, generator=generator).to(self.device)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latent_shape[0],), generator=generator).to(self.device)
        loss = self.diffusion_loss(batch, noise=noise, timesteps=timesteps)
        self.log("val/loss", loss, prog_bar=True, batch_size=latent_shape[0], sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        """The optimizer over the method's parameter groups (`encoder` at `optim.lr`, `adapter` at
        `method.adapter_lr`); without an `adapter_lr`, one group of every trained parameter in the module's
        order, so checkpoints written before methods existed resume with their optimizer state."""
        groups = self.method.param_groups()
        grouped = [p for group in groups for p in group["params"]]
        if {id(p) for p in grouped} != {id(p) for p in self.trainable_parameters()} or len(grouped) != len(
            {id(p) for p in grouped}
        ):
            raise RuntimeError(f"method {self.method.name}'s parameter groups are not the trained parameters")
        if self.method.adapter_lr is None:
            groups = [{"params": self.trainable_parameters()}]
        optimizer = self.optimizer_factory(groups)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """After each optimizer step the method's own step runs (OFT: COFT projects every rotation block back
        inside its radius)."""
        super().optimizer_step(*args, **kwargs)
        self.method.after_optimizer_step()

    # ----------------------------------------------------------------------------------- sampling
    def pipeline(self, scheduler: str | None = None):
        """A stock diffusers pipeline over this module's (adapted) components, sampling with `scheduler`
        (default: the `sampling` group's)."""
        scheduler = make_scheduler(scheduler or self.sampling.scheduler, self.noise_scheduler.config)
        return build_pipeline(
            self.unet, self.vae, self.text_encoder, self.tokenizer, scheduler, **self.second_text_encoder()
        )

    def second_text_encoder(self) -> dict[str, Any]:
        """`{text_encoder_2, tokenizer_2}` of an SDXL backbone (for `build_pipeline`), else empty."""
        if self.text_encoder_2 is None:
            return {}
        return {"text_encoder_2": self.text_encoder_2, "tokenizer_2": self.tokenizer_2}

    def validation_samples(self, batch: dict[str, Any], max_images: int) -> torch.Tensor:
        """Images generated from the first `max_images` samples of `batch`, drawn once per batch and step.

        Callbacks that look at validation generations (sample grids, controllability metrics) share them,
        so a validation pays for sampling once: the first request generates the whole batch (its size,
        `data.val_batch_size`, is what the largest consumer scores) and later ones take a prefix.
        """
        n = min(max_images, len(batch["caption"]))
        tag = (self.global_step, tuple(batch.get("key", batch["caption"])))
        cached = getattr(self, "_validation_cache", None)
        if cached is None or cached[0] != tag:
            self._validation_cache = (tag, self.generate(batch["condition"], batch["caption"]))
        return self._validation_cache[1][:n]

    def generate(self, condition: torch.Tensor, prompts: Sequence[str], **kwargs: Any) -> torch.Tensor:
        """Images in [0, 1] for conditions in [0, 1]; keyword arguments as `sample_controlled`."""
        options = (
            dict(
                num_inference_steps=self.sampling.steps,
                guidance_scale=self.sampling.guidance_scale,
                negative_prompt=self.sampling.negative_prompt,
                strength=self.sampling.strength,
                generator=torch.Generator().manual_seed(self.sampling.seed),
            )
            | kwargs
        )
        was_training = self.training
        self.eval()
        try:
            return sample_controlled(self.pipeline(), self.method, condition, prompts, **options)
        finally:
            self.train(was_training)

    # ----------------------------------------------------------------------------------- checkpoints
    def checkpoint_identity(self) -> dict[str, Any]:
        return checkpoint_identity(self.backbone_spec, self.oft_config, self.condition, self.method)

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors only (the method's: e.g. control encoder and rotations); refuses non-finite
        values."""
        trained = set(self.trainable_names())
        state = {k: v for k, v in self.state_dict().items() if k in trained}
        broken = [k for k, v in state.items() if not torch.isfinite(v).all()]
        if broken:
            raise FloatingPointError(f"refusing to save a checkpoint with non-finite weights in {broken[:5]}")
        return state

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the trained tensors: the frozen backbone is reloaded from its own weights."""
        checkpoint["state_dict"] = self.trained_state_dict()
        checkpoint[CHECKPOINT_META] = self.checkpoint_identity()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse checkpoints from another backbone, method, OFT layout or task, and ones missing trained
        tensors."""
        check_identity(checkpoint.get(CHECKPOINT_META), self.checkpoint_identity(), "", "this run's config")
        missing = sorted(set(self.trainable_names()) - set(checkpoint["state_dict"]))
        unexpected = sorted(set(checkpoint["state_dict"]) - set(self.trainable_names()))
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint tensors do not match: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )

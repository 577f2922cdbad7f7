"""Controllability on the toy world: OFT and COFT against LoRA, ControlNet, T2I-Adapter and full finetuning.

    python -m benchmarks.controllability [--quick] [--no-write] [--jobs 2] [--threads 1]
                                         [--model-path DIR] [--data-root DIR] [--json PATH]

Every method is trained from the same seed on the same toy-world canny shards (``data_prep.demo``), for
the same number of steps with the same batches, noise, timesteps and caption dropout, and evaluated at the
same steps on the same held-out validation conditions with the same sampler (the project's
``OFTControlModule.generate``: a stock diffusers pipeline, DDIM, classifier-free guidance with the control
in both branches). Scores are the project's validation metric (``src.callbacks.controllability``): canny
F1 of the generated images against their own targets and against the other samples' targets (the chance
level), and the toy judge's caption fidelity (``src.toy.judge``: colour, shape and object accuracy).

The methods, each with a three-value learning-rate sweep:

- ``OFT paper``: ``conf/oft/paper.yaml`` (4 blocks, exact Cayley, COFT), our control encoder;
- ``OFT fast``: ``conf/oft/fast.yaml`` (block 32, Cayley-Neumann, COFT), our control encoder;
- ``OFT no COFT``: the paper preset without the COFT projection;
- ``Floor``: our control encoder alone on the frozen UNet (what the rotations add is measured above it);
- ``LoRA r=4``, ``LoRA r=16``: peft LoRA (alpha = r) on the OFT presets' target layers, our encoder;
- ``ControlNet``: ``diffusers.ControlNetModel.from_unet`` (the trainable copy with its own hint encoder),
  residuals into the frozen UNet, gradient clipping 1.0 as diffusers' ``train_controlnet.py`` does;
- ``T2I-Adapter``: ``diffusers.T2IAdapter`` (full adapter, channels of the toy UNet's three levels),
  features added inside the frozen UNet's down blocks;
- ``Full finetune``: every UNet weight trainable, our encoder.

Every run is the project's Lightning module (``OFTControlModule``: the backbone, our control encoder, the
rotations); methods without rotations merge the module's identity rotations away first (``merge_oft``,
exact at step 0), then add their own adapter. Zero-initialised methods (all but T2I-Adapter) equal the
base model at step 0. One loss for all (``diffusion_loss``: the module's training step, with the VAE
latents of the shared batches computed once; the training timesteps are the module's own
``sample_timesteps``, mode ``Schedule.timestep_sampling``: ``cubic``, ``t = (1 - u^3) T``, the project's
demo default in ``conf/train.yaml``) and AdamW (weight decay 0, as ``conf/train.yaml``).

Sweep (successive halving): each of a method's three learning rates trains ``sweep_steps``; the one with
the lowest held-out denoising loss there (``selection_loss``: the same loss without caption dropout, on
the validation conditions other than the reported ones, each with ``selection_draws`` fixed (latent,
noise, timestep) draws from a seeded generator, the same for every method and lr) trains on to ``steps``
and is the one reported. Canny F1 on those selection conditions at ``sweep_steps`` is reported beside the
loss but chooses nothing (with 16 conditions it is noise at that horizon). Each run is a forked child
process with its own torch threads (peak memory is its own ``ru_maxrss`` above its RSS at its start, so
concurrent children do not see each other); ``--jobs N`` children run at once (default 2 on the full
schedule, 1 on ``--quick``): first the sweep runs, each method's continuation as soon as its sweep is in.
Every run is deterministic from its own seed, so ``--jobs`` changes the timings, not the scores. A run
saves itself at ``sweep_steps`` (to a temporary folder) and the winner's goes on in a new child from
exactly there. HE drift: relative change of the hyperspherical energy of the adapted layers' effective
weights (OFT: ``W R``; LoRA: ``W + BA``; full finetune: ``W``; ControlNet: the trainable copy's layers of
the same names) against their pretrained values.

At the start it prints a time estimate from the schedule (``estimate``: recorded per-method step times,
the evaluation count, the machine's load and ``--jobs``), then progress lines (run, step, elapsed, the
run's and the whole benchmark's ETA) suited to following a long run in a log.

Writes the table between its markers in benchmarks/README.md and the plots
``benchmarks/controllability_f1.png`` and ``benchmarks/controllability_fidelity.png``. ``--quick`` runs
two optimizer steps per method at one learning rate on two conditions and writes nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import resource
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import cache, partial
from pathlib import Path
from types import SimpleNamespace

import peft
import psutil
import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from benchmarks import readme
from benchmarks.readme import machine
from benchmarks.train_step import MAX_GRAD_NORM, oft_preset
from data_prep.demo import TOY_TRAIN
from src.callbacks.controllability import ControllabilityMetric
from src.callbacks.energy import rotated_rows
from src.data.datamodule import ShardDataModule
from src.data.pipeline import to_model_inputs
from src.models.backbone import BackboneSpec, load_backbone
from src.models.control import control_injection
from src.models.module import OFTControlModule
from src.models.sampling import SamplingOptions
from src.oft import OFTConfig, hyperspherical_energy, merge_oft, oft_layers, project_coft_
from src.oft.peft_compat import union_pattern
from src.toy import judge as toy

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- controllability:start -->", "<!-- controllability:end -->"
F1_PLOT = Path(__file__).with_name("controllability_f1.png")
FIDELITY_PLOT = Path(__file__).with_name("controllability_fidelity.png")
DEFAULT_MODEL = ROOT / "assets" / "toy-sd"
DEFAULT_DATA = (
    Path(os.environ.get("OFT_CONTROL_CACHE", "~/.cache/oft-control")).expanduser() / "data" / "demo"
)
#: one learning-rate grid for every method (the recorded run chose its lowest value for 8 of 9 methods, so
#: this grid does not bracket every method's optimum)
LRS = (3e-4, 1e-3, 3e-3)


@dataclass(frozen=True)
class Schedule:
    """How long every method trains, how it is swept and how it is evaluated."""

    batch_size: int
    steps: int  # optimizer steps of each method's best learning rate
    sweep_steps: int  # every learning rate trains this far; the lowest selection loss here goes on
    eval_steps: tuple[int, ...]
    eval_images: int  # held-out conditions scored at every evaluation (as many others select the lr)
    sampler_steps: int  # DDIM steps
    guidance_scale: float = 9.0
    seed: int = 0
    lr_index: tuple[int, ...] = (0, 1, 2)  # which values of each grid are swept
    timestep_sampling: str = "cubic"  # the module's `sample_timesteps` mode: `cubic` or `uniform`
    selection_draws: int = 4  # fixed (latent, noise, timestep) draws per selection condition
    selection_f1: bool = True  # also score canny F1 on the selection conditions (shown, chooses nothing)
    caption_dropout: float = 0.5  # the module's probability of training on "" instead of the caption

    def __post_init__(self) -> None:
        if not 0 < self.sweep_steps <= self.steps:
            raise ValueError(f"sweep_steps {self.sweep_steps} is not in 1..steps ({self.steps})")
        if list(self.eval_steps) != sorted(set(self.eval_steps)) or self.eval_steps[0] < 0:
            raise ValueError(f"eval_steps {self.eval_steps} are not increasing steps from 0")
        if self.eval_steps[-1] != self.steps:
            raise ValueError(f"the last eval step {self.eval_steps[-1]} is not steps ({self.steps})")
        if self.timestep_sampling not in ("uniform", "cubic"):
            raise ValueError(f"timestep_sampling '{self.timestep_sampling}' is not one of: uniform, cubic")
        if self.selection_draws < 1:
            raise ValueError(f"selection_draws {self.selection_draws} < 1")


FULL = Schedule(
    batch_size=16,  # the demo default (conf/data/demo.yaml)
    steps=1000,
    sweep_steps=150,
    eval_steps=(0, 100, 250, 500, 1000),
    eval_images=16,
    sampler_steps=20,
    guidance_scale=9.0,
)
QUICK = Schedule(
    batch_size=2, steps=2, sweep_steps=1, eval_steps=(0, 2), eval_images=2, sampler_steps=2, lr_index=(1,)
)
#: children at once unless --jobs says otherwise
DEFAULT_JOBS = {"full": 2, "quick": 1}
#: a child prints its progress every this many optimizer steps (and after every evaluation)
PROGRESS_EVERY = 50


# ------------------------------------------------------------------------------------------ adapters
def _nothing() -> None:
    return None


@dataclass
class Adapter:
    """What a method trains on a built module and how its control reaches the UNet.

    ``encoder``: our control encoder (added at ``conv_in``), or None; ``residuals(condition)`` installs a
    control of another kind (ControlNet, T2I-Adapter) on the UNet for a block; ``weights()`` gives the
    effective weights of the adapted layers by name (for the HE drift).
    """

    trainable: dict[str, nn.Parameter]
    encoder: nn.Module | None
    weights: Callable[[], dict[str, Tensor]]
    residuals: Callable[[Tensor], AbstractContextManager] = lambda condition: nullcontext()
    before_step: Callable[[], None] = _nothing
    after_step: Callable[[], None] = _nothing

    @property
    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.trainable.values())


def _trainable(prefix: str, module: nn.Module) -> dict[str, nn.Parameter]:
    return {f"{prefix}.{n}": p for n, p in module.named_parameters() if p.requires_grad}


def _plain_weights(root: nn.Module, names: list[str]) -> Callable[[], dict[str, Tensor]]:
    """Weights of the named plain layers of ``root`` (those it has)."""
    modules = dict(root.named_modules())
    return lambda: {n: modules[n].weight.detach() for n in names if n in modules}


def oft_adapter(module: OFTControlModule) -> Adapter:
    """The module as the project trains it: rotations and our encoder; COFT after each step if on."""
    unet = module.unet
    after = partial(project_coft_, unet) if module.oft_config.coft else _nothing
    return Adapter(
        trainable=_trainable("unet", unet) | _trainable("encoder", module.encoder),
        encoder=module.encoder,
        weights=lambda: {name: rotated_rows(layer)[0] for name, layer in oft_layers(unet)},
        after_step=after,
    )


def floor_adapter(module: OFTControlModule) -> Adapter:
    """Our control encoder alone on the frozen UNet."""
    return Adapter(
        _trainable("encoder", module.encoder),
        module.encoder,
        _plain_weights(module.unet, module.adapted_layers),
    )


def lora_adapter(module: OFTControlModule, rank: int) -> Adapter:
    """peft LoRA (alpha = rank, so scale 1) on the OFT targets, with our encoder."""
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        target_modules=union_pattern(module.oft_config.target_modules),
    )
    peft.inject_adapter_in_model(config, module.unet)
    modules = dict(module.unet.named_modules())

    def weights() -> dict[str, Tensor]:
        return {
            n: (modules[n].base_layer.weight + modules[n].get_delta_weight("default")).detach()
            for n in module.adapted_layers
        }

    return Adapter(
        _trainable("unet", module.unet) | _trainable("encoder", module.encoder), module.encoder, weights
    )


def full_adapter(module: OFTControlModule) -> Adapter:
    """Every UNet weight trainable, with our encoder."""
    module.unet.requires_grad_(True)
    return Adapter(
        _trainable("unet", module.unet) | _trainable("encoder", module.encoder),
        module.encoder,
        _plain_weights(module.unet, module.adapted_layers),
    )


def _repeat(x: Tensor, batch: int) -> Tensor:
    """``x`` repeated to a batch of ``batch`` (classifier-free guidance doubles the UNet's batch)."""
    return x if x.shape[0] == batch else x.repeat(batch // x.shape[0], *([1] * (x.dim() - 1)))


def controlnet_adapter(module: OFTControlModule) -> Adapter:
    """``ControlNetModel.from_unet``: its residuals enter the frozen UNet at every call (both CFG branches)."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(module.unet).train()
    trainable = _trainable("controlnet", net)

    @contextmanager
    def residuals(condition: Tensor) -> Iterator[None]:
        def hook(_unet: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            sample, timestep = args[0], args[1] if len(args) > 1 else kwargs["timestep"]
            down, mid = net(
                sample,
                timestep,
                encoder_hidden_states=kwargs["encoder_hidden_states"],
                controlnet_cond=_repeat(condition, sample.shape[0]),
                return_dict=False,
            )
            return args, {
                **kwargs,
                "down_block_additional_residuals": down,
                "mid_block_additional_residual": mid,
            }

        handle = module.unet.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    return Adapter(
        trainable,
        None,
        _plain_weights(net, module.adapted_layers),
        residuals,
        before_step=lambda: torch.nn.utils.clip_grad_norm_(trainable.values(), MAX_GRAD_NORM),
    )


def t2i_adapter(module: OFTControlModule) -> Adapter:
    """``T2IAdapter`` (full adapter) with one feature level per UNet down block, computed once per block."""
    from diffusers import T2IAdapter

    channels = list(module.unet.config.block_out_channels)
    adapter = T2IAdapter(
        in_channels=3,
        channels=channels,
        num_res_blocks=2,
        downscale_factor=module.vae_scale_factor,
        adapter_type="full_adapter",
    ).train()

    @contextmanager
    def residuals(condition: Tensor) -> Iterator[None]:
        features = adapter(condition)

        def hook(_unet: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            batch = args[0].shape[0]  # the UNet pops from the list: a fresh one per call
            return args, {
                **kwargs,
                "down_intrablock_additional_residuals": [_repeat(f, batch) for f in features],
            }

        handle = module.unet.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    return Adapter(_trainable("adapter", adapter), None, dict, residuals)


@dataclass(frozen=True)
class Method:
    """A row of the table: the module's OFT config (None: rotations merged away), its adapter, its lr grid."""

    key: str
    name: str
    build: Callable[[OFTControlModule], Adapter]
    lrs: tuple[float, float, float]
    preset: str | None = "paper"
    coft: bool = True
    rotations: bool = False
    zero_init: bool = True

    def oft_config(self) -> OFTConfig:
        return replace(_preset(self.preset or "paper"), coft=self.coft)


@cache
def _preset(name: str) -> OFTConfig:
    """``conf/oft/<name>.yaml``, composed once per process (forked children inherit it)."""
    return oft_preset(name)


METHODS: tuple[Method, ...] = (
    Method("oft_paper", "OFT paper (r=4, exact, COFT)", oft_adapter, LRS, "paper", rotations=True),
    Method("oft_fast", "OFT fast (b=32, Neumann, COFT)", oft_adapter, LRS, "fast", rotations=True),
    Method("oft_nocoft", "OFT no COFT (r=4, exact)", oft_adapter, LRS, "paper", coft=False, rotations=True),
    Method("floor", "Floor: control encoder only", floor_adapter, LRS),
    Method("lora4", "peft LoRA r=4", partial(lora_adapter, rank=4), LRS),
    Method("lora16", "peft LoRA r=16", partial(lora_adapter, rank=16), LRS),
    Method("controlnet", "ControlNet (from_unet)", controlnet_adapter, LRS),
    Method("t2i", "T2I-Adapter (full)", t2i_adapter, LRS, zero_init=False),
    Method("full", "Full finetune + encoder", full_adapter, LRS),
)


def build_run(method: Method, spec: BackboneSpec, schedule: Schedule) -> tuple[OFTControlModule, Adapter]:
    """A fresh module on the backbone (seeded) and the method's adapter on it."""
    torch.manual_seed(schedule.seed)
    sampling = SamplingOptions(
        scheduler="ddim",
        num_inference_steps=schedule.sampler_steps,
        guidance_scale=schedule.guidance_scale,
        seed=schedule.seed,
    )
    module = OFTControlModule(
        spec,
        method.oft_config(),
        optimizer=torch.optim.AdamW,
        sampling=sampling,
        timestep_sampling=schedule.timestep_sampling,
        caption_dropout=schedule.caption_dropout,
    )
    if not method.rotations:
        merge_oft(module.unet)  # identity rotations -> plain layers with W I = W exactly
    return module, method.build(module)


# ------------------------------------------------------------------------------------------ data
@dataclass
class Batches:
    """The training batches every run sees, in order, with the frozen VAE's latent distribution cached."""

    conditions: list[Tensor]  # float [B, 3, H, W] in [0, 1]
    captions: list[list[str]]
    means: list[Tensor]  # the VAE's latent mean and std, in its memory layout (channels-last here)
    stds: list[Tensor]
    scaling_factor: float = 1.0

    def __len__(self) -> int:
        return len(self.captions)

    @torch.no_grad()
    def append(self, batch: dict, vae: nn.Module) -> None:
        """Add a model-input batch, its images encoded once by the frozen VAE."""
        dist = vae.encode(batch["image"]).latent_dist
        self.conditions.append(batch["condition"])
        self.captions.append(list(batch["caption"]))
        self.means.append(dist.mean)
        self.stds.append(dist.std)
        self.scaling_factor = vae.config.scaling_factor

    def latents(self, index: int) -> Tensor:
        """A draw of batch ``index``'s scaled latents, exactly as ``OFTControlModule.encode_images`` draws it."""
        mean, std = self.means[index], self.stds[index]
        return (mean + std * torch.randn(mean.shape, dtype=mean.dtype)) * self.scaling_factor


def demo_datamodule(data_root: Path, schedule: Schedule) -> ShardDataModule:
    from data_prep.demo import build_demo

    shards = build_demo("canny", data_root)
    module = ShardDataModule(
        str(shards / "train-*.tar"),
        str(shards / "val-*.tar"),
        condition="canny",
        resolution=64,
        batch_size=schedule.batch_size,
        val_batch_size=2 * schedule.eval_images,
        shuffle_buffer=256,
        seed=schedule.seed,
    )
    module.setup()
    return module


def training_batches(datamodule: ShardDataModule, vae: nn.Module, count: int) -> Batches:
    """The first ``count`` training batches (epochs repeat, reshuffled), latents encoded once."""
    batches = Batches([], [], [], [])
    while len(batches) < count:
        for raw in datamodule.train_dataloader():
            batches.append(to_model_inputs(raw), vae)
            if len(batches) == count:
                break
    return batches


@dataclass
class HeldOut:
    """Validation samples: ``report`` is scored at every evaluation, ``select`` (others) picks the lr."""

    report: dict
    select: dict


def held_out_batches(datamodule: ShardDataModule) -> HeldOut:
    """The first ``val_batch_size`` validation samples in order, split in two halves."""
    batch = to_model_inputs(next(iter(datamodule.val_dataloader())))
    half = len(batch["caption"]) // 2
    if half < 1:
        raise ValueError(f"need at least 2 validation samples, got {len(batch['caption'])}")
    return HeldOut(
        *(
            {k: v[s] for k, v in batch.items() if k != "data_counts"}
            for s in (slice(0, half), slice(half, 2 * half))
        )
    )


# ------------------------------------------------------------------------------------------ one run
def diffusion_loss(module: OFTControlModule, adapter: Adapter, batches: Batches, index: int) -> Tensor:
    """The module's training step (``training_step``: caption dropout, then ``diffusion_loss`` with its own
    latent draw and ``sample_timesteps``), drawn in the same order from the global RNG, on cached latents
    and with the method's control in place of the module's encoder alone."""
    captions = module.drop_captions(batches.captions[index])
    latents = batches.latents(index)
    noise = torch.randn_like(latents)
    timesteps = module.sample_timesteps(latents.shape[0], latents.device)
    return denoising_loss(module, adapter, latents, noise, timesteps, captions, batches.conditions[index])


def denoising_loss(
    module: OFTControlModule,
    adapter: Adapter,
    latents: Tensor,
    noise: Tensor,
    timesteps: Tensor,
    captions: list[str],
    condition: Tensor,
) -> Tensor:
    """MSE between the UNet's prediction (with the method's control) and the scheduler's target."""
    noisy = module.noise_scheduler.add_noise(latents, noise, timesteps)
    text = module.encode_prompts(captions)
    with control(module, adapter, condition):
        prediction = module.unet(noisy, timesteps, encoder_hidden_states=text).sample
    return F.mse_loss(prediction.float(), module.diffusion_target(latents, noise, timesteps).float())


#: added to the schedule's seed for the selection draws (training uses seed + 1)
SELECTION_SEED = 1_000


@dataclass
class SelectionInputs:
    """Fixed draws on the selection conditions: ``latents``, ``noise``, ``timesteps`` hold one entry per
    draw, each a batch of all the conditions."""

    latents: list[Tensor]
    noise: list[Tensor]
    timesteps: list[Tensor]
    captions: list[str]
    condition: Tensor


def selection_inputs(module: OFTControlModule, batch: dict, schedule: Schedule) -> SelectionInputs:
    """``schedule.selection_draws`` draws of (latent, noise, timestep) for every condition of ``batch``,
    by the module's own ``encode_images`` and ``sample_timesteps`` from a generator seeded by the schedule
    alone: the same for every method and lr. The global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(schedule.seed + SELECTION_SEED)
        latents, noise, timesteps = [], [], []
        for _ in range(schedule.selection_draws):
            latents.append(module.encode_images(batch["image"]))
            noise.append(torch.randn_like(latents[-1]))
            timesteps.append(module.sample_timesteps(latents[-1].shape[0], latents[-1].device))
    return SelectionInputs(latents, noise, timesteps, list(batch["caption"]), batch["condition"])


@torch.no_grad()
def selection_loss(module: OFTControlModule, adapter: Adapter, inputs: SelectionInputs) -> float:
    """The held-out denoising loss that chooses the lr: ``denoising_loss`` (no caption dropout) averaged
    over the fixed draws; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        losses = [
            denoising_loss(module, adapter, latents, noise, timesteps, inputs.captions, inputs.condition)
            for latents, noise, timesteps in zip(inputs.latents, inputs.noise, inputs.timesteps, strict=True)
        ]
    return torch.stack(losses).mean().item()


@contextmanager
def control(module: OFTControlModule, adapter: Adapter, condition: Tensor) -> Iterator[None]:
    """The method's control on the module's UNet for a block: our encoder's injection and/or residuals."""
    with ExitStack() as stack:
        if adapter.encoder is not None:
            stack.enter_context(control_injection(module.unet, adapter.encoder, condition))
        stack.enter_context(adapter.residuals(condition))
        yield


def generate(module: OFTControlModule, adapter: Adapter, condition: Tensor, captions: list[str]) -> Tensor:
    """The module's sampler (its ``generate``), with the method's residuals installed around it."""
    with adapter.residuals(condition):
        return module.generate(condition, captions, strength=1.0 if adapter.encoder is not None else 0.0)


_NOT_SANITY = SimpleNamespace(sanity_checking=False)


def evaluate(module: OFTControlModule, adapter: Adapter, batch: dict) -> dict[str, float]:
    """The training run's validation metric (canny F1 and its chance level, caption fidelity) on ``batch``,
    and the caption fidelity against shuffled captions; the global RNG is left as it was."""
    rng = torch.get_rng_state()
    try:
        return _evaluate(module, adapter, batch)
    finally:
        torch.set_rng_state(rng)
        module.train()


def _evaluate(module: OFTControlModule, adapter: Adapter, batch: dict) -> dict[str, float]:
    metric = ControllabilityMetric(
        "canny", max_images=len(batch["caption"]), num_inference_steps=module.sampling.steps
    )
    stand_in = SimpleNamespace(generate=lambda c, p, **_: generate(module, adapter, c, p))
    metric.on_validation_batch_end(_NOT_SANITY, stand_in, None, batch, 0)
    scores = metric.scores()
    chance = toy.caption_fidelity(metric.generated, toy.shuffled(metric.captions))
    return scores | {f"caption_{k}_chance": chance[k] for k in ("colour_acc", "shape_acc", "object_acc")}


def he_drift(adapter: Adapter, reference: dict[str, Tensor]) -> dict[str, float]:
    """Mean and max relative change of the adapted layers' hyperspherical energy (nan if none)."""
    current = adapter.weights()
    drifts = [
        ((hyperspherical_energy(w) - reference[n]).abs() / reference[n]).item() for n, w in current.items()
    ]
    if not drifts:
        return {"he_drift_mean": float("nan"), "he_drift_max": float("nan")}
    return {"he_drift_mean": sum(drifts) / len(drifts), "he_drift_max": max(drifts)}


@dataclass
class RunState:
    module: OFTControlModule
    adapter: Adapter
    optimizer: torch.optim.Optimizer
    reference: dict[str, Tensor]
    label: str = ""
    evals: dict[int, dict[str, float]] = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)
    step: int = 0
    selection_loss: float = float("nan")
    selection_f1: float = float("nan")
    diverged_at: int | None = None  # the step whose loss was not finite; training stops there


def start_run(method: Method, lr: float, spec: BackboneSpec, schedule: Schedule) -> RunState:
    module, adapter = build_run(method, spec, schedule)
    reference = {n: hyperspherical_energy(w) for n, w in adapter.weights().items()}
    optimizer = torch.optim.AdamW(adapter.trainable.values(), lr=lr, weight_decay=0.0)
    torch.manual_seed(schedule.seed + 1)  # the same noise, timesteps and caption dropout for every method
    return RunState(module, adapter, optimizer, reference, label=run_label(method, lr))


def run_label(method: Method, lr: float) -> str:
    return f"{method.name} @ lr {lr:g}"


def _clock(seconds: float) -> str:
    """``1h02m``, ``12m05s`` or ``42s``."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def print_scores(label: str, step: int, scores: dict[str, float], loss: float | None = None) -> None:
    print(
        f"    {label}: step {step}: F1 {scores['canny_f1']:.3f} (chance {scores['canny_f1_chance']:.3f}), "
        f"colour {scores['caption_colour_acc']:.2f}, shape {scores['caption_shape_acc']:.2f}"
        + ("" if loss is None else f", training loss {loss:.4f}"),
        flush=True,
    )


def train_until(state: RunState, until: int, batches: Batches, held_out: dict, schedule: Schedule) -> None:
    """Optimizer steps up to ``until``, evaluating at the schedule's steps after step 0; prints progress."""
    state.module.train()
    began, first = time.perf_counter(), state.step
    while state.step < until and state.diverged_at is None:
        step_began = time.perf_counter()
        state.optimizer.zero_grad(set_to_none=True)
        loss = diffusion_loss(state.module, state.adapter, batches, state.step)
        loss.backward()
        state.adapter.before_step()
        state.optimizer.step()
        state.adapter.after_step()
        state.step_seconds.append(time.perf_counter() - step_began)
        state.step += 1
        if not math.isfinite(loss.item()):
            state.diverged_at = state.step
            print(f"    {state.label}: loss not finite at step {state.step}; stopped", flush=True)
        elif state.step in schedule.eval_steps:
            scores = evaluate(state.module, state.adapter, held_out)
            state.evals[state.step] = (
                scores | he_drift(state.adapter, state.reference) | {"loss": loss.item()}
            )
            print_scores(state.label, state.step, scores, loss.item())
        if state.step % PROGRESS_EVERY == 0 or state.step == until:
            elapsed = time.perf_counter() - began
            rate = elapsed / (state.step - first)  # seconds per step of this child, evaluations included
            print(
                f"    {state.label}: step {state.step}/{until} in {_clock(elapsed)} "
                f"({rate:.2f} s/step with evaluations), run ETA {_clock(rate * (until - state.step))}",
                flush=True,
            )


def summary(state: RunState, start_rss: int) -> dict:
    """What the parent reports of a run: its evaluations, cost and size."""
    trained = {k: p.detach().contiguous() for k, p in state.adapter.trainable.items()}
    times = state.step_seconds[min(5, len(state.step_seconds) - 1) :]  # the first steps allocate AdamW state
    return {
        "evals": state.evals,
        "steps": state.step,
        "lr": state.optimizer.param_groups[0]["lr"],  # a continuation: the saved optimizer's
        "selection_loss": state.selection_loss,
        "selection_f1": state.selection_f1,
        "diverged_at": state.diverged_at,
        "trainable": state.adapter.trainable_count,
        "checkpoint_bytes": len(safetensors_bytes(trained)),
        "step_s": statistics.median(times) if times else float("nan"),
        # this process's own high-water mark (a forked child starts its own) above its RSS at its start
        "peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start_rss) / 2**20,
    }


_SAVED = ("step", "evals", "step_seconds", "selection_loss", "selection_f1", "diverged_at")


def save_state(state: RunState, path: Path, peak_mb: float) -> None:
    """What the run needs to go on exactly where it stopped: trained tensors, AdamW, RNG, progress."""
    torch.save(
        {
            "trained": {k: p.detach() for k, p in state.adapter.trainable.items()},
            "optimizer": state.optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "peak_mb": peak_mb,
            **{key: getattr(state, key) for key in _SAVED},
        },
        path,
    )


def load_state(state: RunState, path: Path) -> float:
    """Put a saved run back into a freshly built one (same method, lr and seed); returns its peak memory."""
    saved = torch.load(path, weights_only=False)
    with torch.no_grad():
        for name, param in state.adapter.trainable.items():
            param.copy_(saved["trained"][name])
    state.optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    for key in _SAVED:
        setattr(state, key, saved[key])
    return saved["peak_mb"]


def run_child(
    conn,
    method: Method,
    lr: float,
    spec: BackboneSpec,
    schedule: Schedule,
    batches: Batches,
    held_out: HeldOut,
    threads: int,
    evaluate_start: bool,
    checkpoint: Path,
    resume: bool,
) -> None:
    """Child side. Sweep phase: (step 0 if asked,) train to ``sweep_steps``, the selection loss (and F1) on
    the selection conditions, save the run to ``checkpoint``, report. Resume phase: load it and train on to
    ``steps``, report."""
    try:
        torch.set_num_threads(threads)
        start_rss = psutil.Process().memory_info().rss
        state = start_run(method, lr, spec, schedule)
        if resume:
            earlier_peak = load_state(state, checkpoint)
            train_until(state, schedule.steps, batches, held_out.report, schedule)
            result = summary(state, start_rss)
            conn.send(result | {"peak_mb": max(result["peak_mb"], earlier_peak)})
            return
        if evaluate_start and 0 in schedule.eval_steps:  # every lr starts from the same model
            scores = evaluate(state.module, state.adapter, held_out.report)
            state.evals[0] = scores | he_drift(state.adapter, state.reference)
            print_scores(state.label, 0, scores)
        train_until(state, schedule.sweep_steps, batches, held_out.report, schedule)
        if state.diverged_at is None:
            inputs = selection_inputs(state.module, held_out.select, schedule)
            state.selection_loss = selection_loss(state.module, state.adapter, inputs)
            if schedule.selection_f1:
                state.selection_f1 = evaluate(state.module, state.adapter, held_out.select)["canny_f1"]
        result = summary(state, start_rss)
        save_state(state, checkpoint, result["peak_mb"])
        conn.send(result)
    except BaseException:  # report the failure to the parent instead of dying silently
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------ estimate
#: Median seconds per optimizer step with one torch thread, by method, at batch 8, as measured by the
#: 250-step run of 2026-12-01 (before the recorded 1000-step table), at a 1-minute load average of 3.1.
STEP_SECONDS_AT_8: dict[str, float] = {
    "oft_paper": 0.292,
    "oft_fast": 0.435,
    "oft_nocoft": 0.387,
    "floor": 0.244,
    "lora4": 0.303,
    "lora16": 0.216,
    "controlnet": 0.156,
    "t2i": 0.065,
    "full": 0.168,
}
#: step time ~ (batch / 8) ** exponent: 0 if the tiny model's steps are all per-op overhead, 1 if all
#: arithmetic; the estimate takes the middle and prints the range (--quick's batch-2 steps were not faster
#: than those batch-8 ones, so the truth is likely nearer 0; nothing has been timed at batch 16 yet)
BATCH_EXPONENT, BATCH_EXPONENT_RANGE = 0.5, (0.0, 1.0)
#: that run's 22.5 minutes less its training steps, data and child starts, over its 72 evaluations
EVAL_SECONDS = 3.5  # one evaluation of 16 conditions at 20 DDIM steps; scaled by conditions x steps
CHILD_SECONDS = 2.0  # a child builds its module (and loads its checkpoint)
ENCODE_SECONDS = 0.005  # the parent's shard decoding and VAE encoding, per training image
RECORDED_LOAD = 3.1  # the 1-minute load average at that run's start (before its one child ran)


def step_seconds(key: str, batch: int, exponent: float = BATCH_EXPONENT) -> float:
    """The recorded step time of method ``key``, scaled from batch 8 to ``batch``."""
    return STEP_SECONDS_AT_8.get(key, 0.3) * (batch / 8) ** exponent


def speed(jobs: int, cores: int, background: float) -> float:
    """Runs' worth of progress per second with ``jobs`` children on ``cores`` next to ``background``
    runnable threads, relative to one child at the recorded load: each thread gets
    ``min(1, cores / runnable)`` of a core."""
    share = lambda runnable: min(1.0, cores / max(runnable, 1.0))  # noqa: E731
    recorded = share(RECORDED_LOAD + 1)  # the recorded run: one child next to its start's load
    return jobs * share(max(background, 0.0) + jobs) / recorded


@dataclass
class Task:
    """One child: a method's sweep run at one lr (to ``sweep_steps``) or the winner's continuation."""

    method: Method
    lr: float | None  # None: the continuation, before its sweep has chosen the lr
    resume: bool = False
    evaluate_start: bool = False
    checkpoint: Path | None = None

    def steps(self, schedule: Schedule) -> int:
        return schedule.steps - schedule.sweep_steps if self.resume else schedule.sweep_steps

    def evaluations(self, schedule: Schedule) -> int:
        """Evaluations of ``eval_images`` conditions this child runs."""
        low, high = (schedule.sweep_steps, schedule.steps) if self.resume else (0, schedule.sweep_steps)
        count = sum(low < s <= high for s in schedule.eval_steps)
        if not self.resume:
            count += int(self.evaluate_start and 0 in schedule.eval_steps) + int(schedule.selection_f1)
        return count

    def seconds(self, schedule: Schedule, exponent: float = BATCH_EXPONENT) -> float:
        """Estimated seconds of this child alone at the recorded load."""
        if self.resume and schedule.steps == schedule.sweep_steps:
            return 0.0
        evaluation = EVAL_SECONDS * schedule.eval_images / 16 * schedule.sampler_steps / 20
        loss = 0 if self.resume else schedule.selection_draws * schedule.eval_images / schedule.batch_size / 3
        return (
            CHILD_SECONDS
            + (self.steps(schedule) + loss) * step_seconds(self.method.key, schedule.batch_size, exponent)
            + self.evaluations(schedule) * evaluation
        )

    def label(self) -> str:
        return (
            run_label(self.method, self.lr) if self.lr is not None else f"{self.method.name} (continuation)"
        )


def swept_lrs(method: Method, schedule: Schedule) -> list[float]:
    return [method.lrs[i] for i in schedule.lr_index]


def plan(methods: tuple[Method, ...], schedule: Schedule) -> list[Task]:
    """Every sweep run, costliest method first (so the last continuation to start is a cheap one), then
    one continuation per method (its lr set once its sweep is in)."""
    order = sorted(methods, key=lambda m: -Task(m, None, resume=True).seconds(schedule))
    sweeps = [
        Task(m, lr, evaluate_start=i == 0) for m in order for i, lr in enumerate(swept_lrs(m, schedule))
    ]
    continuations = [Task(m, None, resume=True) for m in methods if schedule.steps > schedule.sweep_steps]
    return sweeps + continuations


def estimate(
    methods: tuple[Method, ...], schedule: Schedule, jobs: int, cores: int, background: float
) -> dict[str, float]:
    """Seconds the schedule should take: data, the runs' work at the recorded load, the wall time with
    ``jobs`` (and its range over ``BATCH_EXPONENT_RANGE``)."""
    tasks = plan(methods, schedule)
    data = ENCODE_SECONDS * schedule.steps * schedule.batch_size
    rate = speed(min(jobs, len(tasks)), cores, background)
    work = {e: sum(t.seconds(schedule, e) for t in tasks) for e in (BATCH_EXPONENT, *BATCH_EXPONENT_RANGE)}
    low, high = (data + work[e] / rate for e in BATCH_EXPONENT_RANGE)
    return {
        "data_s": data,
        "work_s": work[BATCH_EXPONENT],
        "speed": rate,
        "wall_s": data + work[BATCH_EXPONENT] / rate,
        "wall_range_s": (low, high),
        "runs": len(tasks),
        "evaluations": sum(t.evaluations(schedule) for t in tasks),
        "steps": sum(t.steps(schedule) for t in tasks),
    }


def estimate_line(found: dict, schedule: Schedule, jobs: int, background: float) -> str:
    low, high = found["wall_range_s"]
    return (
        f"estimate: {found['runs']} runs ({len(schedule.lr_index)} lr x {schedule.sweep_steps} steps per "
        f"method, then {schedule.steps - schedule.sweep_steps} more for each method's best), "
        f"{found['steps']} optimizer steps at batch {schedule.batch_size}, {found['evaluations']} evaluations "
        f"of {schedule.eval_images} conditions at DDIM {schedule.sampler_steps}: {_clock(found['work_s'])} of "
        f"one-run work at the step times recorded at batch 8 (load {RECORDED_LOAD:g}) scaled by "
        f"(batch/8)^{BATCH_EXPONENT:g}, + {_clock(found['data_s'])} of data; --jobs {jobs} next to a load of "
        f"{background:.1f} on {os.cpu_count()} cores goes {found['speed']:.2f}x that: about "
        f"{_clock(found['wall_s'])} in all ({_clock(min(low, high))} to {_clock(max(low, high))} for step "
        f"times from independent of to proportional to the batch)"
    )


# ------------------------------------------------------------------------------------------ sweep
def choose_lr(sweep: dict[float, dict]) -> float:
    """The swept lr with the lowest selection loss (the first such in the grid on a tie); runs that
    diverged or whose selection loss is not finite are out."""
    finite = {
        lr: r["selection_loss"]
        for lr, r in sweep.items()
        if r["diverged_at"] is None and math.isfinite(r["selection_loss"])
    }
    if not finite:
        raise FloatingPointError(f"diverged at every learning rate {list(sweep)}")
    return min(finite, key=finite.__getitem__)


def launch(task: Task, common: tuple) -> tuple:
    """``run_child`` for ``task`` in a forked child; (the parent's end of its pipe, the process)."""
    context = multiprocessing.get_context("fork")
    parent_end, child_end = context.Pipe(duplex=False)
    args = (child_end, task.method, task.lr, *common, task.evaluate_start, task.checkpoint, task.resume)
    child = context.Process(target=run_child, args=args, daemon=True)
    child.start()
    child_end.close()
    return parent_end, child


def receive(conn, child, task: Task) -> dict:
    """The child's report (it has exited after sending it); raises on its failure."""
    try:
        result = conn.recv()
    except EOFError:
        child.join()
        result = {"error": f"the child exited with code {child.exitcode} before reporting"}
    child.join()
    conn.close()
    if "error" in result:
        raise RuntimeError(f"{task.label()} failed:\n{result['error']}")
    return result


class Progress:
    """Runs done and the ETA: what is left of the estimated work, scaled by how long the finished runs took
    against their estimates (before any has: by the start's estimate of the slowdown of ``jobs`` runs)."""

    def __init__(self, tasks: list[Task], schedule: Schedule, jobs: int, rate: float) -> None:
        self.jobs, self.ratio = jobs, jobs / rate  # a run's seconds per estimated second, at first
        self.left = {id(t): t.seconds(schedule) for t in tasks}
        self.started: dict[int, float] = {}
        self.total, self.done_estimate, self.done_actual = len(tasks), 0.0, 0.0
        self.began = time.perf_counter()

    def start(self, task: Task) -> None:
        self.started[id(task)] = time.perf_counter()

    def finish(self, task: Task) -> tuple[float, str]:
        """The run's seconds and a ``[done/total runs, elapsed, ETA]`` note."""
        now = time.perf_counter()
        seconds = now - self.started.pop(id(task))
        self.done_estimate += self.left.pop(id(task))
        self.done_actual += seconds
        if self.done_estimate > 0:
            self.ratio = self.done_actual / self.done_estimate
        in_flight = sum(now - began for began in self.started.values())
        left = max(0.0, self.ratio * sum(self.left.values()) - in_flight)
        eta = left / min(self.jobs, max(len(self.left), 1))
        done = self.total - len(self.left)
        return seconds, f"[{done}/{self.total} runs, {_clock(now - self.began)} so far, ETA {_clock(eta)}]"


def run_all(
    methods: tuple[Method, ...],
    spec: BackboneSpec,
    schedule: Schedule,
    batches: Batches,
    held_out: HeldOut,
    threads: int,
    jobs: int,
    rate: float = 1.0,
) -> list[dict]:
    """Every task of ``plan`` in forked children, ``jobs`` at a time (a continuation first once its sweep
    is in): each method's lrs to ``sweep_steps``, the lowest selection loss on to ``steps`` (a new child that
    loads the run where it stopped). Returns the table's rows in the order of ``methods``."""
    tasks = plan(methods, schedule)
    waiting = [t for t in tasks if not t.resume]
    continuation = {t.method.key: t for t in tasks if t.resume}
    ready: list[Task] = []
    sweeps: dict[str, dict[float, dict]] = {m.key: {} for m in methods}
    final: dict[str, dict] = {}
    running: dict = {}
    progress = Progress(tasks, schedule, jobs, rate)
    common = (spec, schedule, batches, held_out, threads)
    with tempfile.TemporaryDirectory(prefix="controllability-") as tmp:
        for task in waiting:
            index = swept_lrs(task.method, schedule).index(task.lr)
            task.checkpoint = Path(tmp) / f"{task.method.key}-lr{index}.pt"
        try:
            while waiting or ready or running:
                while len(running) < jobs and (ready or waiting):
                    task = (ready or waiting).pop(0)
                    print(f"  start {task.label()}: {'continuation' if task.resume else 'sweep'}", flush=True)
                    progress.start(task)
                    conn, child = launch(task, common)
                    running[conn] = (task, child)
                for conn in multiprocessing.connection.wait(list(running)):
                    task, child = running.pop(conn)
                    result = receive(conn, child, task)
                    seconds, note = progress.finish(task)
                    key = task.method.key
                    if task.resume:
                        final[key] = result
                        task.checkpoint.unlink(missing_ok=True)
                        print(f"  {task.label()} done in {_clock(seconds)} {note}", flush=True)
                        continue
                    sweeps[key][task.lr] = result
                    print(
                        f"  {task.label()} swept in {_clock(seconds)}: selection loss "
                        f"{result['selection_loss']:.5f}, F1 {result['selection_f1']:.3f} {note}",
                        flush=True,
                    )
                    if len(sweeps[key]) < len(schedule.lr_index):
                        continue
                    try:
                        best = choose_lr(sweeps[key])
                    except FloatingPointError as error:
                        raise FloatingPointError(f"{task.method.name} {error}") from None
                    print(f"  {task.method.name}: lr {best:g} has the lowest selection loss", flush=True)
                    keep = next(t.checkpoint for t in tasks if t.method is task.method and t.lr == best)
                    for path in Path(tmp).glob(f"{key}-lr*.pt"):
                        if path != keep:
                            path.unlink()
                    if key in continuation:
                        continuation[key].lr, continuation[key].checkpoint = best, keep
                        ready.append(continuation[key])
                    else:
                        final[key] = sweeps[key][best]
        finally:  # on a failure, stop the runs still going (only the children started here)
            for conn, (_, child) in running.items():
                child.terminate()
                child.join()
                conn.close()
    return [row(m, swept_lrs(m, schedule), sweeps[m.key], final[m.key]) for m in methods]


def row(method: Method, lrs: list[float], sweep: dict[float, dict], final: dict) -> dict:
    """A method's row: its final run, with every swept lr's selection scores and evaluations."""
    best = choose_lr(sweep)
    start = {k: v for k, v in sweep[lrs[0]]["evals"].items() if k == 0}  # scored once, by the first lr
    for result in [*sweep.values(), final]:
        result["evals"] = {**start, **result["evals"]}
    return {
        "name": method.name,
        "key": method.key,
        "zero_init": method.zero_init,
        "lrs": list(method.lrs),
        "swept": lrs,
        "best_lr": best,
        "selection_loss": {str(lr): sweep[lr]["selection_loss"] for lr in lrs},
        "selection_f1": {str(lr): sweep[lr]["selection_f1"] for lr in lrs},
        "sweep": {str(lr): sweep[lr]["evals"] for lr in lrs},
        **{k: v for k, v in final.items() if not k.startswith("selection_")},  # the chosen lr's: above
    }


def shared_data(spec: BackboneSpec, data_root: Path, schedule: Schedule) -> tuple[Batches, HeldOut]:
    """The training batches (latents encoded once) and the held-out conditions every run shares. Seeded:
    in the main process the pipeline's shuffle and augmentation seeds include ``torch.initial_seed()``,
    which is random per process unless set, so unseeded two runs of the benchmark trained on different
    batches."""
    torch.manual_seed(schedule.seed)
    datamodule = demo_datamodule(data_root, schedule)
    batches = training_batches(datamodule, load_backbone(spec).vae, schedule.steps)
    return batches, held_out_batches(datamodule)


def measure(
    schedule: Schedule,
    model_path: Path,
    data_root: Path,
    threads: int,
    methods: tuple[Method, ...] = METHODS,
    jobs: int = 1,
) -> dict:
    """Build the shared data once, then sweep every method; returns everything the report needs."""
    torch.set_num_threads(threads)
    began, load = time.perf_counter(), os.getloadavg()[0]
    found = estimate(methods, schedule, jobs, os.cpu_count() or 1, load)
    print(estimate_line(found, schedule, jobs, load), flush=True)
    spec = BackboneSpec(name="toy", path=str(model_path), resolution=64, local_files_only=True)
    batches, held_out = shared_data(spec, data_root, schedule)
    print(f"data ready in {_clock(time.perf_counter() - began)}", flush=True)
    for method in methods:  # compose the presets once, before any child is forked
        method.oft_config()
    rows = run_all(methods, spec, schedule, batches, held_out, threads, jobs, found["speed"])
    seconds = time.perf_counter() - began
    print(f"all runs done in {_clock(seconds)} (estimated {_clock(found['wall_s'])})", flush=True)
    return {
        "schedule": asdict(schedule),
        "model_path": str(model_path),
        "rows": rows,
        "seconds": seconds,
        "estimated_seconds": found["wall_s"],
        "load": (load, os.getloadavg()[0]),
        "date": datetime.date.today().isoformat(),
        "threads": threads,
        "jobs": jobs,
    }


# ------------------------------------------------------------------------------------------ report
def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


def _lr_cell(row: dict) -> str:
    grid = row["swept"]
    edge = " (grid edge)" if len(grid) > 1 and row["best_lr"] in (min(grid), max(grid)) else ""
    return f"{row['best_lr']:g}{edge}"


def table(result: dict) -> str:
    """The markdown table: F1 at every evaluated step, final chance and fidelity, HE drift, cost."""
    steps = result["schedule"]["eval_steps"]
    head = [
        "method",
        "lr",
        *(f"F1 @{s}" for s in steps),
        "F1 chance",
        "colour acc",
        "shape acc",
        "HE drift max",
        "trainable",
        "checkpoint",
        "s/step",
        "peak MB",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for row in result["rows"]:
        evals = {int(k): v for k, v in row["evals"].items()}
        last = evals[max(evals)]
        drift = last["he_drift_max"]
        cells = [
            row["name"],
            _lr_cell(row),
            *(f"{evals[s]['canny_f1']:.3f}" if s in evals else "-" for s in steps),
            f"{last['canny_f1_chance']:.3f}",
            f"{last['caption_colour_acc']:.2f}",
            f"{last['caption_shape_acc']:.2f}",
            "-" if math.isnan(drift) else f"{drift:.1e}",
            _fmt_params(row["trainable"]),
            _fmt_bytes(row["checkpoint_bytes"]),
            f"{row['step_s']:.3f}",
            f"{row['peak_mb']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def probe_step(schedule: dict) -> int | None:
    """The last evaluated step within the sweep (every lr is scored there on the reported conditions)."""
    within = [s for s in schedule["eval_steps"] if 0 < s <= schedule["sweep_steps"]]
    return within[-1] if within else None


def sweep_lines(result: dict) -> list[str]:
    """Each method's selection loss, selection F1 and reported F1 for every swept learning rate."""
    probe = probe_step(result["schedule"])
    out = []
    for row in result["rows"]:
        cells = []
        for lr, evals in row["sweep"].items():
            loss, f1 = row["selection_loss"][lr], row["selection_f1"][lr]
            if not math.isfinite(loss):
                cells.append(f"{float(lr):g}: diverged")
                continue
            mark = " (chosen)" if float(lr) == row["best_lr"] else ""
            reported = f" / {evals[probe]['canny_f1']:.3f}" if probe in evals else ""
            cells.append(f"{float(lr):g}{mark}: {loss:.5f}, F1 {f1:.3f}{reported}")
        out.append(f"- {row['name']}: " + "; ".join(cells))
    return out


def render(result: dict, command: str) -> str:
    s = result["schedule"]
    base = {int(k): v for k, v in result["rows"][0]["evals"].items()}[0]
    model = Path(result["model_path"])
    model = model.relative_to(ROOT) if model.is_relative_to(ROOT) else model
    sampling = {"cubic": "`cubic`, t = (1 - u^3) T", "uniform": "`uniform`"}[s["timestep_sampling"]]
    header = (
        f"Measured {result['date']} with `{command}` in {result['seconds'] / 60:.1f} minutes on "
        f"{machine()} (torch {torch.__version__}; {result['jobs']} runs at "
        f"a time, {result['threads']} torch thread each; 1-minute load average {result['load'][0]:.1f} at the "
        f"start, {result['load'][1]:.1f} at the end). Backbone `{model}`; toy-world canny demo shards ({TOY_TRAIN} "
        f"training scenes, batch {s['batch_size']}, {s['steps']} steps, caption dropout "
        f"{s.get('caption_dropout', 0.5):g}, training "
        f"timesteps {sampling}: the module's `sample_timesteps`); {s['eval_images']} held-out validation "
        f"conditions, DDIM {s['sampler_steps']} steps, guidance {s['guidance_scale']:g}, seed {s['seed']}. "
        f"Learning rates: every value of the method's grid trains {s['sweep_steps']} steps; the lowest "
        f"held-out denoising loss there on {s['eval_images']} other validation conditions (each with "
        f"{s['selection_draws']} fixed latent, noise and timestep draws, the same for every run) trains on "
        f"to {s['steps']} (shown). Base model (step 0): F1 {base['canny_f1']:.3f} (chance "
        f"{base['canny_f1_chance']:.3f}), caption colour {base['caption_colour_acc']:.2f} / shape "
        f"{base['caption_shape_acc']:.2f} (shuffled captions {base['caption_colour_acc_chance']:.2f} / "
        f"{base['caption_shape_acc_chance']:.2f})."
    )
    probe = probe_step(s)
    reported = f" / canny F1 on the {s['eval_images']} reported ones at step {probe}" if probe else ""
    sweep = [
        f"Learning-rate selection at step {s['sweep_steps']} (lr: selection loss, which chose the lr, and "
        f"canny F1 on the {s['eval_images']} selection conditions{reported}):",
        "",
        *sweep_lines(result),
    ]
    plots = (
        "![canny F1 vs step](controllability_f1.png)\n![caption fidelity vs step]"
        "(controllability_fidelity.png)"
    )
    return "\n\n".join([header, table(result), "\n".join(sweep), plots])


def plot(result: dict, f1_path: Path = F1_PLOT, fidelity_path: Path = FIDELITY_PLOT) -> None:
    """F1 vs step per method (with the chance level), caption colour and shape accuracy vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"oft": "-", "floor": ":", "lora": "--", "controlnet": "-.", "t2i": "-.", "full": "--"}
    curves = []
    for row in result["rows"]:
        evals = sorted((int(k), v) for k, v in row["evals"].items())
        style = next((v for k, v in styles.items() if row["key"].startswith(k)), "-")
        curves.append((f"{row['name']} (lr {row['best_lr']:g})", style, evals))
    fig, ax = plt.subplots(figsize=(10.5, 5))
    for label, style, evals in curves:
        ax.plot([s for s, _ in evals], [v["canny_f1"] for _, v in evals], style, marker="o", label=label)
    chance = statistics.mean(v["canny_f1_chance"] for _, _, evals in curves for _, v in evals)
    ax.axhline(chance, color="grey", lw=1, label=f"chance (other conditions), mean {chance:.3f}")
    ax.set(xlabel="training step", ylabel="canny F1 vs own condition", title="Toy world: canny F1 vs step")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(f1_path, dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8), sharey=True)
    for ax, key, title in zip(
        axes, ("caption_colour_acc", "caption_shape_acc"), ("colour", "shape"), strict=True
    ):
        for label, style, evals in curves:
            ax.plot([s for s, _ in evals], [v[key] for _, v in evals], style, marker="o", label=label)
        chance = statistics.mean(v[f"{key}_chance"] for _, _, evals in curves for _, v in evals)
        ax.axhline(chance, color="grey", lw=1, label=f"shuffled captions, mean {chance:.2f}")
        ax.set(
            xlabel="training step", ylabel=f"caption {title} accuracy (toy judge)", title=f"Caption {title}"
        )
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(fidelity_path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="2 steps per method at one lr; writes nothing")
    parser.add_argument("--no-write", action="store_true", help="print only, leave README.md and plots alone")
    parser.add_argument(
        "--jobs",
        type=int,
        help=f"runs at a time, each a child process (default {DEFAULT_JOBS['full']}; "
        f"{DEFAULT_JOBS['quick']} with --quick)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument(
        "--model-path", type=Path, default=DEFAULT_MODEL, help="diffusers folder of the backbone"
    )
    parser.add_argument(
        "--data-root", type=Path, default=DEFAULT_DATA, help="where the demo shards are built"
    )
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    jobs = DEFAULT_JOBS["quick" if args.quick else "full"] if args.jobs is None else args.jobs
    if jobs < 1:
        parser.error(f"--jobs {jobs} < 1")
    schedule = QUICK if args.quick else FULL
    result = measure(schedule, args.model_path, args.data_root, args.threads or 1, jobs=jobs)
    shown = [a for a in (sys.argv[1:] if argv is None else argv) if a not in ("--json", str(args.json))]
    command = " ".join(["python -m benchmarks.controllability", *shown])  # --json changes no result
    section = render(result, command)
    print(section)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if not (args.quick or args.no_write):
        plot(result)
        readme.write_section(section, readme.README, START, END)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

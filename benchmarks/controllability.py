"""Controllability on the toy world: OFT and COFT against LoRA, ControlNet, T2I-Adapter and full finetuning.

    python -m benchmarks.controllability [--quick] [--no-write] [--threads 1] [--model-path DIR]
                                         [--data-root DIR] [--json PATH]

Every method is trained from the same seed on the same toy-world canny shards (``data_prep.demo``), for
the same number of steps with the same batches, noise and timesteps, and evaluated at the same steps on
the same held-out validation conditions with the same sampler (the project's ``OFTControlModule.generate``:
a stock diffusers pipeline, DDIM, classifier-free guidance with the control in both branches). Scores are
the project's validation metric (``src.callbacks.controllability``): canny F1 of the generated images
against their own targets and against the other samples' targets (the chance level), and the toy judge's
caption fidelity (``src.metrics.toy``: colour, shape and object accuracy).

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
base model at step 0. One loss for all (``diffusion_loss``: the module's, with the VAE latents of the
shared batches computed once) and AdamW (weight decay 0, as ``conf/train.yaml``).

Sweep (successive halving): each of a method's three learning rates trains ``sweep_steps``; the one with
the best canny F1 there, on as many validation conditions other than the reported ones, trains on to
``steps`` and is the one reported. Each run is a forked child process (peak memory is its own
``ru_maxrss`` over its start); a run saves itself at ``sweep_steps`` (to a temporary folder) and the
winner's goes on in a new child from exactly there. HE drift: relative change of the hyperspherical
energy of the adapted layers' effective weights (OFT: ``W R``; LoRA: ``W + BA``; full finetune: ``W``;
ControlNet: the trainable copy's layers of the same names) against their pretrained values.

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
import os
import platform
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
from benchmarks.train_step import MAX_GRAD_NORM, oft_preset
from src.callbacks.controllability import ControllabilityMetric
from src.callbacks.energy import rotated_rows
from src.data.datamodule import ShardDataModule
from src.data.pipeline import to_model_inputs
from src.metrics import toy
from src.models.backbone import BackboneSpec, load_backbone
from src.models.control import control_injection
from src.models.module import OFTControlModule
from src.models.sampling import SamplingOptions
from src.oft import OFTConfig, hyperspherical_energy, merge_oft, oft_layers, project_coft_
from src.oft.peft_compat import union_pattern

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- controllability:start -->", "<!-- controllability:end -->"
F1_PLOT = Path(__file__).with_name("controllability_f1.png")
FIDELITY_PLOT = Path(__file__).with_name("controllability_fidelity.png")
DEFAULT_MODEL = ROOT / "assets" / "toy-sd"
DEFAULT_DATA = (
    Path(os.environ.get("OFT_CONTROL_CACHE", "~/.cache/oft-control")).expanduser() / "data" / "demo"
)
#: one learning-rate grid for every method (a pilot put full finetuning's best at 1e-3 too, not lower)
LRS = (3e-4, 1e-3, 3e-3)


@dataclass(frozen=True)
class Schedule:
    """How long every method trains, how it is swept and how it is evaluated."""

    batch_size: int
    steps: int  # optimizer steps of each method's best learning rate
    sweep_steps: int  # every learning rate trains this far; the best canny F1 here goes on to `steps`
    eval_steps: tuple[int, ...]
    eval_images: (
        int  # held-out validation conditions scored at every evaluation (as many others select the lr)
    )
    sampler_steps: int  # DDIM steps
    guidance_scale: float = 9.0
    seed: int = 0
    lr_index: tuple[int, ...] = (0, 1, 2)  # which values of each grid are swept


FULL = Schedule(
    batch_size=8, steps=250, sweep_steps=100, eval_steps=(0, 100, 250), eval_images=16, sampler_steps=20
)
QUICK = Schedule(
    batch_size=2, steps=2, sweep_steps=1, eval_steps=(0, 2), eval_images=2, sampler_steps=2, lr_index=(1,)
)


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
    module = OFTControlModule(spec, method.oft_config(), optimizer=torch.optim.AdamW, sampling=sampling)
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
    """``OFTControlModule.diffusion_loss`` (MSE on the scheduler's target, uniform timesteps, caption
    dropout) on cached latents, with the method's control in place of the module's encoder alone."""
    latents = batches.latents(index)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, module.noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
    noisy = module.noise_scheduler.add_noise(latents, noise, timesteps)
    text = module.encode_prompts(module.drop_captions(batches.captions[index]))
    with control(module, adapter, batches.conditions[index]):
        prediction = module.unet(noisy, timesteps, encoder_hidden_states=text).sample
    return F.mse_loss(prediction.float(), module.diffusion_target(latents, noise, timesteps).float())


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
    evals: dict[int, dict[str, float]] = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)
    step: int = 0
    selection_f1: float = float("nan")
    diverged_at: int | None = None  # the step whose loss was not finite; training stops there


def start_run(method: Method, lr: float, spec: BackboneSpec, schedule: Schedule) -> RunState:
    module, adapter = build_run(method, spec, schedule)
    reference = {n: hyperspherical_energy(w) for n, w in adapter.weights().items()}
    optimizer = torch.optim.AdamW(adapter.trainable.values(), lr=lr, weight_decay=0.0)
    torch.manual_seed(schedule.seed + 1)  # the same noise, timesteps and caption dropout for every method
    return RunState(module, adapter, optimizer, reference)


def train_until(state: RunState, until: int, batches: Batches, held_out: dict, schedule: Schedule) -> None:
    """Optimizer steps up to ``until``, evaluating at the schedule's steps after step 0."""
    state.module.train()
    while state.step < until and state.diverged_at is None:
        began = time.perf_counter()
        state.optimizer.zero_grad(set_to_none=True)
        loss = diffusion_loss(state.module, state.adapter, batches, state.step)
        loss.backward()
        state.adapter.before_step()
        state.optimizer.step()
        state.adapter.after_step()
        state.step_seconds.append(time.perf_counter() - began)
        state.step += 1
        if not math.isfinite(loss.item()):
            state.diverged_at = state.step
        elif state.step in schedule.eval_steps:
            state.evals[state.step] = (
                evaluate(state.module, state.adapter, held_out)
                | he_drift(state.adapter, state.reference)
                | {"loss": loss.item()}
            )


def summary(state: RunState, start_rss: int) -> dict:
    """What the parent reports of a run: its evaluations, cost and size."""
    trained = {k: p.detach().contiguous() for k, p in state.adapter.trainable.items()}
    times = state.step_seconds[min(5, len(state.step_seconds) - 1) :]  # the first steps allocate AdamW state
    return {
        "evals": state.evals,
        "steps": state.step,
        "selection_f1": state.selection_f1,
        "diverged_at": state.diverged_at,
        "trainable": state.adapter.trainable_count,
        "checkpoint_bytes": len(safetensors_bytes(trained)),
        "step_s": statistics.median(times) if times else float("nan"),
        "peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start_rss) / 2**20,
    }


def save_state(state: RunState, path: Path, peak_mb: float) -> None:
    """What the run needs to go on exactly where it stopped: trained tensors, AdamW, RNG, progress."""
    torch.save(
        {
            "trained": {k: p.detach() for k, p in state.adapter.trainable.items()},
            "optimizer": state.optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "step": state.step,
            "evals": state.evals,
            "step_seconds": state.step_seconds,
            "selection_f1": state.selection_f1,
            "diverged_at": state.diverged_at,
            "peak_mb": peak_mb,
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
    for key in ("step", "evals", "step_seconds", "selection_f1", "diverged_at"):
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
    """Child side. Sweep phase: (step 0 if asked,) train to ``sweep_steps``, score the selection conditions,
    save the run to ``checkpoint``, report. Resume phase: load it and train on to ``steps``, report."""
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
            state.evals[0] = evaluate(state.module, state.adapter, held_out.report) | he_drift(
                state.adapter, state.reference
            )
        train_until(state, schedule.sweep_steps, batches, held_out.report, schedule)
        if state.diverged_at is None:
            state.selection_f1 = evaluate(state.module, state.adapter, held_out.select)["canny_f1"]
        result = summary(state, start_rss)
        save_state(state, checkpoint, result["peak_mb"])
        conn.send(result)
    except BaseException:  # report the failure to the parent instead of dying silently
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------ sweep
def in_child(method: Method, lr: float, *args) -> dict:
    """``run_child(method, lr, *args)`` in a forked child; its report."""
    context = multiprocessing.get_context("fork")
    parent_end, child_end = context.Pipe(duplex=False)
    child = context.Process(target=run_child, args=(child_end, method, lr, *args))
    child.start()
    child_end.close()
    try:
        return _receive(parent_end, method, lr)
    finally:
        child.join()
        parent_end.close()


def sweep_method(
    method: Method, spec: BackboneSpec, schedule: Schedule, batches: Batches, held_out: HeldOut, threads: int
) -> dict:
    """Every lr of the method to ``sweep_steps`` (one child each); the best canny F1 on the selection
    conditions there goes on to ``steps`` (a new child that loads the run where it stopped)."""
    lrs = [method.lrs[i] for i in schedule.lr_index]
    sweep: dict[float, dict] = {}
    with tempfile.TemporaryDirectory(prefix="controllability-") as tmp:
        saved = {lr: Path(tmp) / f"lr{i}.pt" for i, lr in enumerate(lrs)}
        common = (spec, schedule, batches, held_out, threads)
        for lr in lrs:
            sweep[lr] = in_child(method, lr, *common, not sweep, saved[lr], False)
            print(
                f"  {method.name} lr {lr:g}: F1 {sweep[lr]['selection_f1']:.3f} on the selection conditions "
                f"at step {schedule.sweep_steps} ({sweep[lr]['step_s']:.3f} s/step)",
                flush=True,
            )
        finite = [lr for lr in lrs if sweep[lr]["diverged_at"] is None]
        if not finite:
            raise FloatingPointError(f"{method.name} diverged at every learning rate {lrs}")
        best = max(finite, key=lambda lr: sweep[lr]["selection_f1"])
        longer = schedule.steps > schedule.sweep_steps
        final = in_child(method, best, *common, False, saved[best], True) if longer else sweep[best]
    for result in [*sweep.values(), final]:  # step 0 was scored once, by the first lr's run
        result["evals"] = {**{k: v for k, v in sweep[lrs[0]]["evals"].items() if k == 0}, **result["evals"]}
    return {
        "name": method.name,
        "key": method.key,
        "zero_init": method.zero_init,
        "lrs": list(method.lrs),
        "swept": lrs,
        "best_lr": best,
        "selection": {str(lr): r["selection_f1"] for lr, r in sweep.items()},
        "sweep": {str(lr): r["evals"] for lr, r in sweep.items()},
        **final,
    }


def _receive(pipe, method: Method, lr: float) -> dict:
    result = pipe.recv()
    if "error" in result:
        raise RuntimeError(f"{method.name} at lr {lr:g} failed:\n{result['error']}")
    return result


def measure(
    schedule: Schedule, model_path: Path, data_root: Path, threads: int, methods: tuple[Method, ...] = METHODS
) -> dict:
    """Build the shared data once, then sweep every method; returns everything the report needs."""
    torch.set_num_threads(threads)
    began, load = time.perf_counter(), os.getloadavg()[0]
    spec = BackboneSpec(name="toy", path=str(model_path), resolution=64, local_files_only=True)
    datamodule = demo_datamodule(data_root, schedule)
    batches = training_batches(datamodule, load_backbone(spec).vae, schedule.steps)
    held_out = held_out_batches(datamodule)
    print(f"data ready in {time.perf_counter() - began:.0f} s", flush=True)
    for method in methods:  # compose the presets once, before any child is forked
        method.oft_config()
    rows = []
    for method in methods:
        started = time.perf_counter()
        rows.append(sweep_method(method, spec, schedule, batches, held_out, threads))
        print(
            f"{method.name}: best lr {rows[-1]['best_lr']:g}, {time.perf_counter() - started:.0f} s",
            flush=True,
        )
    return {
        "schedule": asdict(schedule),
        "model_path": str(model_path),
        "rows": rows,
        "seconds": time.perf_counter() - began,
        "load": (load, os.getloadavg()[0]),
        "date": datetime.date.today().isoformat(),
        "threads": threads,
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


def sweep_lines(result: dict) -> list[str]:
    """Each method's canny F1 at the sweep horizon for every learning rate (selection / reported conditions)."""
    horizon = result["schedule"]["sweep_steps"]
    out = []
    for row in result["rows"]:
        values = ", ".join(
            f"{float(lr):g}: {row['selection'][lr]:.3f} / {evals[horizon]['canny_f1']:.3f}"
            if horizon in evals
            else f"{float(lr):g}: diverged"
            for lr, evals in row["sweep"].items()
        )
        out.append(f"- {row['name']}: {values}")
    return out


def render(result: dict, command: str) -> str:
    s = result["schedule"]
    base = {int(k): v for k, v in result["rows"][0]["evals"].items()}[0]
    header = (
        f"Measured {result['date']} with `{command}` in {result['seconds'] / 60:.1f} minutes on "
        f"{os.cpu_count()} CPU cores ({platform.machine()}, torch {torch.__version__}, {result['threads']} torch "
        f"thread; 1-minute load average {result['load'][0]:.1f} at the start, {result['load'][1]:.1f} at the end). "
        f"Backbone `{Path(result['model_path']).relative_to(ROOT) if Path(result['model_path']).is_relative_to(ROOT) else result['model_path']}`; "
        f"toy-world canny demo shards (1024 training scenes, batch {s['batch_size']}, {s['steps']} steps, "
        f"caption dropout 0.5); {s['eval_images']} held-out validation conditions, DDIM {s['sampler_steps']} steps, "
        f"guidance {s['guidance_scale']:g}, seed {s['seed']}. Learning rates: every value of the method's grid "
        f"trains {s['sweep_steps']} steps, the best canny F1 there on {s['eval_images']} other validation conditions "
        f"trains on to {s['steps']} (shown). "
        f"Base model (step 0): F1 {base['canny_f1']:.3f} (chance {base['canny_f1_chance']:.3f}), caption colour "
        f"{base['caption_colour_acc']:.2f} / shape {base['caption_shape_acc']:.2f} (shuffled captions "
        f"{base['caption_colour_acc_chance']:.2f} / {base['caption_shape_acc_chance']:.2f})."
    )
    sweep = [
        f"Canny F1 at step {s['sweep_steps']} per learning rate (lr: on the {s['eval_images']} selection "
        f"conditions, which chose the lr / on the {s['eval_images']} reported ones):",
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
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--model-path", type=Path, default=DEFAULT_MODEL, help="diffusers folder of the backbone"
    )
    parser.add_argument(
        "--data-root", type=Path, default=DEFAULT_DATA, help="where the demo shards are built"
    )
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    result = measure(QUICK if args.quick else FULL, args.model_path, args.data_root, args.threads or 1)
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

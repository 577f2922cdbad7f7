"""One training step of OFT-Control against ControlNet, peft OFT and peft LoRA on the same frozen UNet.

    python -m benchmarks.train_step [--backbone all|tiny|sd15|sdxl] [--repeats 5] [--tiny-repeats 15]
                                    [--threads N] [--clock wall|cpu] [--quick] [--no-write] [--json PATH]

A step is what a trainer does per batch: zero the gradients, the frozen encoders (tiny backbone only),
noise the latents, predict with the control, MSE, backward, the optimizer step (AdamW, lr 1e-5) and the
method's own extras (COFT projection for OFT-Control, gradient clipping for ControlNet as diffusers'
example does). The setups:

- ``Floor: control encoder only``: our control encoder on the frozen UNet, no rotations. Every method pays
  the frozen UNet's forward and its backward to the control's input, so this is the step's floor; every
  row also shows its step time as a ratio to it.
- ``OFT-Control (paper|fast)``: our OFT (``conf/oft/{paper,fast}.yaml``) + our control encoder.
- ``ControlNet``: ``ControlNetModel.from_unet`` trained as ``examples/controlnet/train_controlnet.py``
  trains it: the ControlNet is trainable, its residuals go to the frozen UNet, AdamW over its parameters.
- ``peft OFT (paper|fast)``: the same rotations through peft's OFT (same blocks, targets, Cayley form,
  COFT radius) + our control encoder.
- ``peft LoRA r=16``: LoRA on the same targets + our control encoder.

Time: all setups live in one process on one frozen UNet (they share its weight tensors) and run
interleaved, one warm-up round then ``repeats`` rounds, the order rotated every round; the table shows
medians and the median of the per-round ratios to the floor and to ``OFT-Control (paper)``. Memory: each setup runs two
steps in its own child process (forked from a clean fork server), ``ru_maxrss`` is the kernel's
high-water mark of that process. Checkpoint: bytes of the trained tensors written with safetensors.
The table is rewritten in benchmarks/README.md between its markers. Under the SD1.5 table: where the OFT
presets' time over the floor goes (rotation maths, optimizer, the rest), and the hyperspherical-energy
monitor's cost at its defaults (``conf/callbacks/default.yaml``) as a share of a step.

``--backbone sdxl`` (never part of ``all``; its own README section) times the floor and the two OFT-Control
presets on a random-weight UNet of the public SDXL-base-1.0 config (``src/models/sdxl/``, 2.6B parameters,
10.3 GB in fp32) at 32x32 latents, batch 1, with random pooled text and the size/crop ids of 256 px images.
ControlNet (a trainable 1.25B-parameter copy: weights, gradients and AdamW state, about 20 GB more) does
not fit a 24 GB machine beside the UNet; ``--setups`` adds it where it fits.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import peft
import psutil
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import Tensor, nn

from benchmarks import readme
from benchmarks.readme import machine
from src.callbacks.energy import HypersphericalEnergyDrift, energy_drift
from src.models.control import ControlEncoder, control_injection
from src.models.tiny import build_tiny_pipeline
from src.oft import OFTConfig, OFTLinear, inject_oft, oft_layers, oft_parameters, project_coft_
from src.oft.peft_compat import match_coft_radius, peft_oft_config, union_pattern

ROOT = Path(__file__).resolve().parents[1]
README = readme.README
START, END = "<!-- train_step:start -->", "<!-- train_step:end -->"
SD15 = ROOT / "src" / "models" / "sd15"
REFERENCE = "OFT-Control (paper)"
FLOOR = "Floor: control encoder only"
# Goals for the step time over the floor (SD1.5 UNet at 256 px), and for the HE monitor's amortised share.
FLOOR_TARGETS = {"OFT-Control (fast)": 1.10, REFERENCE: 1.25}
HE_MONITOR_TARGET = 0.02
DIAGNOSTIC = "OFT-Control, merged weight"  # every OFTLinear forced to impl="merged": what impl="auto" avoids
LR = 1e-5
LORA_RANK = 16
MAX_GRAD_NORM = 1.0  # diffusers' train_controlnet.py default (--max_grad_norm)
# What `python -m src.train task=canny` trains with (conf/data/demo.yaml, conf/model/tiny.yaml).
TINY_BATCH, TINY_PIXELS = 4, 64
SD15_LATENT = 32  # 256 px, batch 1
SDXL_LATENT = 32  # 256 px, batch 1
SDXL_SETUPS = (FLOOR, REFERENCE, "OFT-Control (fast)")  # what fits a 24 GB CPU machine beside the SDXL UNet
SDXL_START, SDXL_END = "<!-- train_step_sdxl:start -->", "<!-- train_step_sdxl:end -->"
# Imported once by the fork server so that each memory child starts with everything loaded; the last two
# are what `build_tiny_pipeline` imports lazily.
PRELOAD = [
    __name__,
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
    "transformers.models.clip.modeling_clip",
    "transformers.models.clip.tokenization_clip",
]


# ------------------------------------------------------------------------------------------ backbones
@dataclass
class Backbone:
    """A frozen UNet and the fixed inputs of one training step on it.

    ``encode`` returns ``(latents, text embeddings)`` as the frozen VAE and text encoder would (tiny
    backbone: they run every step; SD1.5: fixed random tensors of the right shapes).
    """

    name: str
    description: str
    unet: nn.Module
    scheduler: object
    condition: Tensor
    noise: Tensor
    timesteps: Tensor
    encode: Callable[[], tuple[Tensor, Tensor]]


def tiny_backbone(seed: int = 0) -> Backbone:
    """The offline tiny SD backbone with its VAE and text encoder, batch 4 at 64 px."""
    pipe = build_tiny_pipeline(seed)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(TINY_BATCH, 3, TINY_PIXELS, TINY_PIXELS, generator=generator) * 2 - 1
    tokens = pipe.tokenizer(
        ["a photo of a cat"] * TINY_BATCH,
        padding="max_length",
        truncation=True,
        max_length=pipe.tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    side = TINY_PIXELS // 8

    @torch.no_grad()
    def encode() -> tuple[Tensor, Tensor]:
        latents = pipe.vae.encode(images).latent_dist.sample() * pipe.vae.config.scaling_factor
        return latents, pipe.text_encoder(tokens)[0]

    return Backbone(
        name="tiny",
        unet=pipe.unet,
        scheduler=pipe.scheduler,
        encode=encode,
        description=f"tiny SD backbone (`src/models/tiny.py`), batch {TINY_BATCH} at {TINY_PIXELS} px "
        f"({side}x{side} latents), frozen VAE and text encoder run every step",
        condition=torch.rand(TINY_BATCH, 3, TINY_PIXELS, TINY_PIXELS, generator=generator),
        noise=torch.randn(TINY_BATCH, 4, side, side, generator=generator),
        timesteps=torch.randint(0, 1000, (TINY_BATCH,), generator=generator),
    )


def sd15_unet() -> nn.Module:
    """A UNet of the public SD1.5 config (`src/models/sd15/unet_config.json`), random weights, frozen."""
    config = json.loads((SD15 / "unet_config.json").read_text())
    return UNet2DConditionModel(**config).requires_grad_(False)


def sd15_backbone(seed: int = 0) -> Backbone:
    """Random-weight SD1.5 UNet at 32x32 latents (256 px), batch 1; VAE and text encoder skipped."""
    torch.manual_seed(seed)
    unet = sd15_unet()
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, SD15_LATENT, SD15_LATENT, generator=generator)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    return Backbone(
        name="sd15",
        unet=unet,
        encode=lambda: (latents, text),
        scheduler=DDPMScheduler(**json.loads((SD15 / "scheduler_config.json").read_text())),
        description=f"random-weight UNet of the public SD1.5 config, batch 1 at {SD15_LATENT * 8} px "
        f"({SD15_LATENT}x{SD15_LATENT} latents); random latents and 77x768 text embeddings stand in for "
        "the frozen VAE and text encoder",
        condition=torch.rand(1, 3, SD15_LATENT * 8, SD15_LATENT * 8, generator=generator),
        noise=torch.randn(1, 4, SD15_LATENT, SD15_LATENT, generator=generator),
        timesteps=torch.randint(0, 1000, (1,), generator=generator),
    )


def self_conditioned(unet: nn.Module, pixels: int, seed: int = 0) -> nn.Module:
    """Make an SDXL UNet (or ControlNet) supply its own ``added_cond_kwargs`` to calls without them: random
    pooled text (fixed per batch size) and the size/crop ids of ``pixels`` px images, so every setup calls it
    as it calls an SD UNet. Structural copies keep the hook; ``controlnet`` puts it on its copy."""
    from src.models.xl import added_conditions

    width = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    pooled: dict[tuple, Tensor] = {}

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if kwargs.get("added_cond_kwargs") is not None:
            return args, kwargs
        sample = args[0] if args else kwargs["sample"]
        key = (sample.shape[0], sample.device)
        if key not in pooled:  # the same values on every device
            text = torch.randn(key[0], width, generator=torch.Generator().manual_seed(seed))
            pooled[key] = text.to(sample.device)
        conditions = added_conditions(pooled[key], pixels, pixels)
        return args, {**kwargs, "added_cond_kwargs": conditions}

    unet.register_forward_pre_hook(hook, with_kwargs=True)
    unet.self_conditioned_pixels = pixels
    return unet


def sdxl_unet() -> nn.Module:
    """A UNet of the public SDXL-base-1.0 config (`src/models/sdxl/unet_config.json`), random weights, frozen."""
    from src.models.xl import full_size_configs

    return UNet2DConditionModel(**full_size_configs()["unet"]).requires_grad_(False)


def sdxl_backbone(seed: int = 0) -> Backbone:
    """Random-weight SDXL UNet at 32x32 latents (256 px), batch 1; VAE and text encoders skipped."""
    torch.manual_seed(seed)
    pixels = SDXL_LATENT * 8
    unet = self_conditioned(sdxl_unet(), pixels, seed)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, SDXL_LATENT, SDXL_LATENT, generator=generator)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    return Backbone(
        name="sdxl",
        unet=unet,
        encode=lambda: (latents, text),
        scheduler=DDPMScheduler(**json.loads((SD15 / "scheduler_config.json").read_text())),
        description=f"random-weight UNet of the public SDXL-base-1.0 config, batch 1 at {pixels} px "
        f"({SDXL_LATENT}x{SDXL_LATENT} latents); random latents, 77x2048 text embeddings, 1280 pooled text "
        "channels and the size/crop ids stand in for the frozen VAE and text encoders",
        condition=torch.rand(1, 3, pixels, pixels, generator=generator),
        noise=torch.randn(1, 4, SDXL_LATENT, SDXL_LATENT, generator=generator),
        timesteps=torch.randint(0, 1000, (1,), generator=generator),
    )


BACKBONES: dict[str, Callable[[], Backbone]] = {
    "tiny": tiny_backbone,
    "sd15": sd15_backbone,
    "sdxl": sdxl_backbone,
}


# ------------------------------------------------------------------------------------------ setups
def _nothing() -> None:
    return None


@dataclass
class Setup:
    """What one method trains and how it predicts: ``predict(noisy, timesteps, text, condition)``."""

    trainable: dict[str, nn.Parameter]
    predict: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
    optimizer: torch.optim.Optimizer
    before_optimizer: Callable[[], None] = _nothing
    after_optimizer: Callable[[], None] = _nothing
    modules: dict[str, nn.Module] = field(default_factory=dict)

    @property
    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.trainable.values())


def structural_copy(unet: nn.Module) -> nn.Module:
    """A copy of ``unet`` that shares its parameter and buffer tensors (adapters wrap layers of the copy)."""
    memo = {id(t): t for t in [*unet.parameters(), *unet.buffers()]}
    return copy.deepcopy(unet, memo)


def oft_preset(name: str) -> OFTConfig:
    """The project's own preset, ``conf/oft/<name>.yaml`` composed by Hydra (defaults resolved)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return instantiate(compose(overrides=[f"+oft={name}"]).oft, _convert_="all")


def _named(prefix: str, module: nn.Module) -> dict[str, nn.Parameter]:
    return {f"{prefix}.{n}": p for n, p in module.named_parameters() if p.requires_grad}


def _with_encoder(unet: nn.Module, after_optimizer: Callable[[], None] = _nothing) -> Setup:
    """The control encoder added to ``unet.conv_in`` (our injection), AdamW over every trainable tensor."""
    encoder = ControlEncoder(unet.conv_in.out_channels, downscale=8)
    trainable = _named("unet", unet) | _named("encoder", encoder)

    def predict(noisy: Tensor, timesteps: Tensor, text: Tensor, condition: Tensor) -> Tensor:
        with control_injection(unet, encoder, condition):
            return unet(noisy, timesteps, text).sample

    optimizer = torch.optim.AdamW(trainable.values(), lr=LR)
    return Setup(
        trainable,
        predict,
        optimizer,
        after_optimizer=after_optimizer,
        modules={"unet": unet, "encoder": encoder},
    )


def floor(base: nn.Module) -> Setup:
    """(0) The floor: our control encoder only, on a copy of the frozen UNet without rotations."""
    return _with_encoder(structural_copy(base))


def oft_control(base: nn.Module, preset: str, impl: str | None = None) -> Setup:
    """(a) Our OFT with a project preset + control encoder; COFT projection after every optimizer step.

    ``impl`` forces every ``OFTLinear`` onto one path (diagnostic rows); ``None`` keeps what
    ``inject_oft`` builds (the library default).
    """
    unet, config = structural_copy(base), oft_preset(preset)
    inject_oft(unet, config)
    for _, layer in oft_layers(unet):
        if impl is not None and isinstance(layer, OFTLinear):
            layer.impl = impl
    assert {id(p) for p in unet.parameters() if p.requires_grad} == {id(p) for p in oft_parameters(unet)}
    return _with_encoder(unet, partial(project_coft_, unet) if config.coft else _nothing)


def controlnet(base: nn.Module) -> Setup:
    """(b) ``ControlNetModel.from_unet`` as diffusers' train_controlnet.py trains it (UNet frozen)."""
    net = ControlNetModel.from_unet(base)
    if hasattr(base, "self_conditioned_pixels"):  # SDXL: the copy needs the pooled text and time ids too
        self_conditioned(net, base.self_conditioned_pixels)
    net.train()
    trainable = _named("controlnet", net)

    def predict(noisy: Tensor, timesteps: Tensor, text: Tensor, condition: Tensor) -> Tensor:
        down, mid = net(
            noisy, timesteps, encoder_hidden_states=text, controlnet_cond=condition, return_dict=False
        )
        return base(
            noisy,
            timesteps,
            encoder_hidden_states=text,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]

    def clip() -> None:
        torch.nn.utils.clip_grad_norm_(trainable.values(), MAX_GRAD_NORM)

    optimizer = torch.optim.AdamW(trainable.values(), lr=LR)
    return Setup(trainable, predict, optimizer, before_optimizer=clip, modules={"controlnet": net})


def peft_oft(base: nn.Module, preset: str) -> Setup:
    """(c) The preset's rotations through peft's OFT + our control encoder.

    peft takes one COFT ``eps`` and uses the radius ``eps / sqrt(n_stored)``; ours is
    ``eps * b^2 / sqrt(n_stored)``, so each peft rotation gets ``eps * b^2`` (its ``eps`` attribute) to
    constrain the same ball. peft projects before every forward, we after every optimizer step.
    """
    unet, config = structural_copy(base), oft_preset(preset)
    peft.inject_adapter_in_model(peft_oft_config(config), unet)
    match_coft_radius(unet, config)
    return _with_encoder(unet)


def peft_lora(base: nn.Module) -> Setup:
    """(d) peft LoRA (rank 16, alpha 16) on the paper preset's targets + our control encoder."""
    targets = oft_preset("paper").target_modules
    config = peft.LoraConfig(
        r=LORA_RANK, lora_alpha=LORA_RANK, lora_dropout=0.0, target_modules=union_pattern(targets)
    )
    unet = structural_copy(base)
    peft.inject_adapter_in_model(config, unet)
    return _with_encoder(unet)


SETUPS: dict[str, Callable[[nn.Module], Setup]] = {
    FLOOR: floor,
    REFERENCE: partial(oft_control, preset="paper"),
    "OFT-Control (fast)": partial(oft_control, preset="fast"),
    "ControlNet": controlnet,
    "peft OFT (paper)": partial(peft_oft, preset="paper"),
    "peft OFT (fast)": partial(peft_oft, preset="fast"),
    f"peft LoRA r={LORA_RANK}": peft_lora,
    f"{DIAGNOSTIC} (paper)": partial(oft_control, preset="paper", impl="merged"),
    f"{DIAGNOSTIC} (fast)": partial(oft_control, preset="fast", impl="merged"),
}


# ------------------------------------------------------------------------------------------ one step
def train_step(backbone: Backbone, setup: Setup) -> Tensor:
    """Zero grads, frozen encoders, noise, predict with control, MSE on epsilon, backward, optimizer."""
    setup.optimizer.zero_grad(set_to_none=True)
    latents, text = backbone.encode()
    noisy = backbone.scheduler.add_noise(latents, backbone.noise, backbone.timesteps)
    prediction = setup.predict(noisy, backbone.timesteps, text, backbone.condition)
    loss = F.mse_loss(prediction.float(), backbone.noise.float())
    loss.backward()
    setup.before_optimizer()
    setup.optimizer.step()
    setup.after_optimizer()
    return loss.detach()


#: What a step's time is read from: wall-clock, or this process's CPU time (with one torch thread, the
#: work done, nearly untouched by other processes competing for the cores of a shared machine).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
Clock = Callable[[], float]


def time_interleaved(
    backbone: Backbone,
    setups: dict[str, Setup],
    repeats: int,
    warmup: int = 1,
    clock: Clock = time.perf_counter,
) -> dict:
    """Seconds per step, ``{name: [t_round1, ...]}``; every round runs each setup once, order rotated."""
    names = list(setups)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = clock()
            train_step(backbone, setups[name])
            if round_ >= warmup:
                times[name].append(clock() - start)
    return times


def median_ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    """Median over rounds of ``t_name / t_reference`` (both measured in the same round)."""
    return statistics.median(a / b for a, b in zip(times[name], times[reference], strict=True))


# ------------------------------------------------------------------------------------------ overheads
def _median_seconds(run: Callable[[], object], repeats: int, clock: Clock) -> float:
    times = []
    for _ in range(repeats):
        start = clock()
        run()
        times.append(clock() - start)
    return statistics.median(times)


def rotation_maths_seconds(setup: Setup, clock: Clock, repeats: int = 3) -> float:
    """Cayley (or Neumann) forward and backward of every adapted layer's blocks, nothing else."""
    layers = [layer for _, layer in oft_layers(setup.modules["unet"])]

    def run() -> None:
        rotations = [layer.rotation() for layer in layers]
        torch.autograd.backward(rotations, [torch.ones_like(r) for r in rotations])

    seconds = _median_seconds(run, repeats, clock)
    setup.optimizer.zero_grad(set_to_none=True)
    return seconds


def optimizer_seconds(backbone: Backbone, setup: Setup, clock: Clock, repeats: int = 3) -> float:
    """Gradient extras, AdamW step and COFT projection of one step (on the gradients of a real step)."""
    train_step(backbone, setup)

    def run() -> None:
        setup.before_optimizer()
        setup.optimizer.step()
        setup.after_optimizer()

    return _median_seconds(run, repeats, clock)


def he_monitor_defaults() -> dict:
    """``every_n_steps`` and ``neurons`` of the HE monitor in ``conf/callbacks/default.yaml``."""
    node = OmegaConf.load(ROOT / "conf" / "callbacks" / "default.yaml").energy
    return {"every_n_steps": int(node.every_n_steps), "neurons": node.neurons}


def he_monitor_seconds(setup: Setup, clock: Clock, repeats: int = 3) -> dict:
    """The HE monitor at its defaults on this setup's UNet: its one-off reference and one call."""
    defaults = he_monitor_defaults()
    monitor = HypersphericalEnergyDrift(**defaults)
    holder = nn.Module()
    holder.unet = setup.modules["unet"]
    start = clock()
    monitor.on_fit_start(None, holder)
    reference = clock() - start
    call = _median_seconds(
        lambda: energy_drift(holder.unet, monitor.reference, monitor.neurons), repeats, clock
    )
    return dict(defaults, reference_s=reference, call_s=call)


def overheads(
    backbone: Backbone, setups: dict[str, Setup], clock: Clock = time.perf_counter
) -> dict[str, dict]:
    """For the floor and each setup with a floor target: optimizer time; for the latter, rotation maths and
    the HE monitor too."""
    result = {FLOOR: {"optimizer_s": optimizer_seconds(backbone, setups[FLOOR], clock)}}
    for name in FLOOR_TARGETS:
        result[name] = {
            "optimizer_s": optimizer_seconds(backbone, setups[name], clock),
            "rotation_s": rotation_maths_seconds(setups[name], clock),
            "he_monitor": he_monitor_seconds(setups[name], clock),
        }
    return result


# ------------------------------------------------------------------------------------------ memory
def checkpoint_bytes(setup: Setup) -> int:
    """Size of the trained tensors written as one safetensors file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trained.safetensors"
        save_file({k: p.detach().contiguous() for k, p in setup.trainable.items()}, str(path))
        return path.stat().st_size


def _rss() -> int:
    return psutil.Process().memory_info().rss


def measure_memory(backbone_name: str, setup_name: str, threads: int) -> dict:
    """Child side: build the backbone and one setup, run two steps, read this process's peak RSS."""
    if threads:
        torch.set_num_threads(threads)
    began, start = time.perf_counter(), _rss()
    backbone = BACKBONES[backbone_name]()
    frozen = _rss()
    setup = SETUPS[setup_name](backbone.unet)
    for _ in range(2):  # AdamW allocates its states in the first step: the second is the steady state
        train_step(backbone, setup)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return dict(
        start_rss=start,
        frozen_rss=frozen,
        peak_rss=peak,
        checkpoint_bytes=checkpoint_bytes(setup),
        checkpoint_tensors=setup.trainable_count,
        seconds=time.perf_counter() - began,
    )


def _memory_child(conn, backbone_name: str, setup_name: str, threads: int) -> None:
    try:
        conn.send(measure_memory(backbone_name, setup_name, threads))
    except BaseException:  # report the failure to the parent instead of dying silently
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


def memory_in_children(backbone_name: str, threads: int, names: list[str]) -> dict[str, dict]:
    """One fresh child per setup, forked from a fork server that only imported modules (never computed)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    results = {}
    for name in names:
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=_memory_child, args=(send, backbone_name, name, threads))
        child.start()
        send.close()
        result = receive.recv()
        child.join()
        if "error" in result:
            raise RuntimeError(f"memory run of {name!r} on {backbone_name} failed:\n{result['error']}")
        results[name] = result
        print(
            f"[{backbone_name}] {name}: peak {result['peak_rss'] / 2**30:.2f} GiB "
            f"({result['seconds']:.1f} s)",
            flush=True,
        )
    return results


# ------------------------------------------------------------------------------------------ report
def setup_names(backbone_name: str) -> list[str]:
    """The setups measured on a backbone: all of them, or on SDXL those that fit beside its UNet."""
    return list(SDXL_SETUPS) if backbone_name == "sdxl" else list(SETUPS)


def measure(
    backbone_name: str, repeats: int, threads: int, clock: str = "wall", names: list[str] | None = None
) -> dict:
    """Memory in children first, then parameter counts and interleaved step times in this process."""
    names = names or setup_names(backbone_name)
    memory = memory_in_children(backbone_name, threads, names)
    backbone = BACKBONES[backbone_name]()
    setups = {name: SETUPS[name](backbone.unet) for name in names}
    load_before = os.getloadavg()[0]
    times = time_interleaved(backbone, setups, repeats, clock=CLOCKS[clock])
    rows = [
        dict(
            name=name,
            trainable=setup.trainable_count,
            step_s=statistics.median(times[name]),
            ratio=median_ratio(times, name, REFERENCE),
            floor_ratio=median_ratio(times, name, FLOOR),
            **memory[name],
        )
        for name, setup in setups.items()
    ]
    pairs = [
        (REFERENCE, "peft OFT (paper)"),
        ("OFT-Control (fast)", "peft OFT (fast)"),
        (REFERENCE, "ControlNet"),
        ("OFT-Control (fast)", "ControlNet"),
    ]
    result = dict(
        backbone=backbone_name,
        description=backbone.description,
        repeats=repeats,
        rows=rows,
        times=times,
        load=(load_before, os.getloadavg()[0]),
        pairs=[(a, b, median_ratio(times, a, b)) for a, b in pairs if a in setups and b in setups],
        overheads=overheads(backbone, setups, CLOCKS[clock]),
        clock=clock,
    )
    del setups, backbone
    gc.collect()
    return result


def table(result: dict) -> str:
    """Markdown table and target lines of one backbone."""
    rows = {r["name"]: r for r in result["rows"]}
    controlnet_count = rows["ControlNet"]["trainable"] if "ControlNet" in rows else None
    lines = [
        f"**{result['description']}** ({result['repeats']} interleaved rounds after 1 warm-up round, "
        f"{'process CPU time' if result.get('clock') == 'cpu' else 'wall-clock time'}; "
        f"load average {result['load'][0]:.1f} before, {result['load'][1]:.1f} after the timed rounds)",
        "",
        "| setup | trainable params | ControlNet / setup | median step (s) | median ratio vs floor | "
        f"median ratio vs {REFERENCE} | peak RSS (GiB) | training adds (GiB) | checkpoint (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows.values():
        lines.append(
            f"| {r['name']} | {r['trainable']:,} | {_per(controlnet_count, r['trainable'])} | {r['step_s']:.3g} | "
            f"{r['floor_ratio']:.2f}x | {r['ratio']:.2f}x | {(r['peak_rss'] - r['start_rss']) / 2**30:.2f} | "
            f"{(r['peak_rss'] - r['frozen_rss']) / 2**30:.2f} | {r['checkpoint_bytes'] / 1e6:.1f} |"
        )
    lines.append("")
    for name, target in FLOOR_TARGETS.items():  # the goals are set for SD1.5 at 256 px
        ratio = rows[name]["floor_ratio"]
        verdict = (
            ("met" if ratio <= target else "not met") if result["backbone"] == "sd15" else "set for SD1.5"
        )
        rounds = ", ".join(
            f"{a / b:.3f}" for a, b in zip(result["times"][name], result["times"][FLOOR], strict=True)
        )
        lines.append(
            f"- step time {name} / floor: {ratio:.3f} (median per-round ratio; goal <= {target}: {verdict}; "
            f"rounds: {rounds})"
        )
    for a, b, ratio in result["pairs"]:
        verdict = "met" if ratio <= 1.0 else "not met"
        lines.append(f"- step time {a} / {b}: {ratio:.3f} (median per-round ratio; target <= 1: {verdict})")
    if controlnet_count is not None:
        lines.append(
            f"- trainable parameters ControlNet / {REFERENCE}: {controlnet_count / rows[REFERENCE]['trainable']:.1f}x"
        )
    return "\n".join([*lines, *overhead_lines(rows, result["times"], result["overheads"])])


def _per(count: int | None, trainable: int) -> str:
    return "-" if count is None else f"{count / trainable:.1f}x"


def overhead_lines(
    rows: dict[str, dict], times: dict[str, list[float]], measured: dict[str, dict]
) -> list[str]:
    """Where each OFT preset's time over the floor goes, and the HE monitor's share of a step."""
    floor_optimizer = measured[FLOOR]["optimizer_s"]
    lines = []
    for name in FLOOR_TARGETS:
        m = measured[name]
        over = statistics.median(a - b for a, b in zip(times[name], times[FLOOR], strict=True))
        optimizer = m["optimizer_s"] - floor_optimizer
        rest = over - m["rotation_s"] - optimizer
        lines.append(
            f"- {name} over the floor: {over:+.2f} s per step (median per-round difference) = rotation maths "
            "(Cayley/Neumann forward "
            f"and backward of every block, measured alone) {m['rotation_s']:.2f} s + AdamW and COFT on the "
            f"rotations {optimizer:.2f} s + the rest {rest:+.2f} s (applying the rotations in the adapted "
            "layers' forward and backward)"
        )
    for name in FLOOR_TARGETS:
        he, step = measured[name]["he_monitor"], rows[name]["step_s"]
        share = he["call_s"] / (he["every_n_steps"] * step)
        verdict = "met" if share <= HE_MONITOR_TARGET else "not met"
        lines.append(
            f"- HE monitor at its defaults ({he['neurons']} neurons per layer, every {he['every_n_steps']} steps) on "
            f"{name}: {he['call_s']:.2f} s per call = {100 * share:.2f}% of a step amortised (goal <= "
            f"{100 * HE_MONITOR_TARGET:.0f}%: {verdict}); reference energies once at fit start {he['reference_s']:.2f} s"
        )
    return lines


def render(results: list[dict], command: str) -> str:
    header = (
        f"Measured {datetime.date.today().isoformat()} with `{command}` on {machine()} "
        f"(torch {torch.__version__}, torch threads: {torch.get_num_threads()})."
    )
    return "\n\n".join([header, *(table(r) for r in results)])


def write_section(body: str, path: Path = README, start: str = START, end: str = END) -> None:
    """This script's section of benchmarks/README.md (see ``benchmarks.readme``)."""
    readme.write_section(body, path, start, end)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--backbone", choices=["all", *BACKBONES], default="all", help="all: tiny and sd15 (sdxl on its own)"
    )
    parser.add_argument("--setups", type=lambda v: v.split(";"), help="';'-separated setup names")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds on SD1.5 (default 5)")
    parser.add_argument("--tiny-repeats", type=int, default=15, help="timed rounds on tiny (default 15)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="tiny backbone, 2 rounds; never writes README")
    parser.add_argument("--no-write", action="store_true", help="print only, leave README.md alone")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="step time from wall-clock (default) or this process's CPU time (a loaded machine; use --threads 1)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = ["tiny"] if args.quick else ["tiny", "sd15"] if args.backbone == "all" else [args.backbone]
    repeats = {"tiny": 2 if args.quick else args.tiny_repeats, "sd15": args.repeats, "sdxl": args.repeats}
    unknown = sorted(set(args.setups or ()) - set(SETUPS))
    if unknown:
        parser.error(f"unknown setup(s) {unknown}; setups: {list(SETUPS)}")
    results = [measure(name, repeats[name], args.threads, args.clock, args.setups) for name in names]
    command = " ".join(["python -m benchmarks.train_step", *(sys.argv[1:] if argv is None else argv)])
    section = render(results, command)
    print(section)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if not (args.quick or args.no_write):
        markers = (SDXL_START, SDXL_END) if names == ["sdxl"] else (START, END)
        write_section(section, README, *markers)
    return results


if __name__ == "__main__":
    # Run through the importable module so the fork server's children find the same functions.
    from benchmarks.train_step import main as _main

    _main()

"""The SD1.5-architecture training step on a CUDA GPU: 512 px, batch 4 and 16, bf16-mixed, in at most 8 minutes.

    benchmarks/gpu.sh                       # = timeout 480 python -m benchmarks.gpu
    python -m benchmarks.gpu [--batches 4,16] [--variants plain,grad_ckpt,compile] [--steps 5]
                             [--budget-s 420] [--no-write] [--json PATH]
    python -m benchmarks.gpu --dry-run      # CPU, a narrow SD-architecture UNet, batches 1 and 2: every path
    python -m benchmarks.gpu --backbone sdxl  # the SDXL rows: 1024 px, batch 1 and 4 (gpu.sh runs both)

Setups (as ``benchmarks/train_step.py`` builds them, on one random-weight UNet of the public SD1.5 config):
the floor (control encoder only), OFT-Control (paper, fast), ControlNet and peft OFT (paper, fast). Each
runs in three variants: ``plain``, ``grad_ckpt`` (gradient checkpointing of the UNet, and of the
ControlNet for ControlNet) and ``compile`` (regional ``torch.compile`` of every ``BasicTransformerBlock``,
as ``module.memory.compile=true`` does; dynamo reset before each such configuration). The dry run traces
with the ``eager`` backend (dynamo only, no code generation) to stay fast. A step is ``benchmarks.train_step.train_step`` with the
prediction under ``torch.autocast(bfloat16)`` (what Lightning's ``bf16-mixed`` does: fp32 weights,
bf16 compute). Per setup it prints the median step time of ``--steps`` timed steps after warm-up, the
peak GPU memory (``torch.cuda.max_memory_allocated``) and what the step adds to the frozen UNet, and the
ratios to the floor and to ControlNet of the same batch and variant.

Runs go in priority order (plain, then gradient checkpointing, batch 4 before 16, then compile, batch 16
first) and stop at ``--budget-s`` seconds after start: what did not fit is listed as skipped (each compiled
configuration pays its compilation; ``--variants compile`` alone gives them the whole budget). Without CUDA (and
without ``--dry-run``) it prints that and exits 0, so ``python -m benchmarks`` on a CPU machine skips it.
On CUDA it rewrites its section of benchmarks/README.md (``--no-write`` to leave it).

``--backbone sdxl``: a random-weight UNet of the public SDXL-base-1.0 config (``src/models/sdxl/``, 2.6B
parameters, fp32 weights under bf16 autocast) at 1024 px (128x128 latents), batch 1 and 4, its added
conditions (pooled text, size/crop ids) supplied as ``benchmarks.train_step.self_conditioned`` does; setups
floor, OFT-Control (paper, fast) and ControlNet (a 1.25B-parameter trainable copy), variants plain and
gradient checkpointing by default; its own README section. ``--dry-run`` with it uses a narrow
SDXL-architecture UNet (``src.models.xl.small_unet_config``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from benchmarks import readme
from benchmarks import train_step as bench

START, END = "<!-- gpu:start -->", "<!-- gpu:end -->"
SETUPS = [
    bench.FLOOR,
    bench.REFERENCE,
    "OFT-Control (fast)",
    "ControlNet",
    "peft OFT (paper)",
    "peft OFT (fast)",
]
VARIANTS = ("plain", "grad_ckpt", "compile")
LATENT = 64  # 512 px
TEXT_TOKENS = 77
COMPILE_RECOMPILE_LIMIT = 32  # SD1.5's transformer blocks see 4 token counts x 3 widths, two strides
SDXL_SETUPS = [bench.FLOOR, bench.REFERENCE, "OFT-Control (fast)", "ControlNet"]
SDXL_VARIANTS = ("plain", "grad_ckpt")
SDXL_LATENT = 128  # 1024 px
SDXL_START, SDXL_END = "<!-- gpu_sdxl:start -->", "<!-- gpu_sdxl:end -->"


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where and what to run: device, UNet factory, latent size, text shape and the runs' lengths."""

    device: torch.device
    unet: Callable[[], nn.Module]
    latent: int
    text_tokens: int
    batches: tuple[int, ...]
    variants: tuple[str, ...]
    setups: tuple[str, ...]
    steps: int
    warmup: int
    compile_backend: str
    budget_s: float
    name: str = "SD1.5"


def dry_unet() -> nn.Module:
    """The SD1.5 UNet config made narrow (widths 32/64, one layer per block, 64-d text): every module
    name and block type of SD1.5, divisible by both OFT presets' blocks, seconds per step on a CPU."""
    config = json.loads((bench.SD15 / "unet_config.json").read_text())
    config.update(block_out_channels=[32, 64, 64, 64], layers_per_block=1, cross_attention_dim=64)
    return UNet2DConditionModel(**config).requires_grad_(False)


def sdxl_unet() -> nn.Module:
    """The SDXL-base-1.0 UNet, random weights, frozen, supplying its added conditions for 1024 px images."""
    return bench.self_conditioned(bench.sdxl_unet(), SDXL_LATENT * 8)


def dry_sdxl_unet() -> nn.Module:
    """A narrow SDXL-architecture UNet (every SDXL block type and the text_time embedding), 64 px images."""
    from src.models.xl import small_unet_config

    return bench.self_conditioned(UNet2DConditionModel(**small_unet_config()).requires_grad_(False), 64)


def make_plan(args: argparse.Namespace) -> Plan:
    if getattr(args, "backbone", "sd15") == "sdxl":
        return sdxl_plan(args)
    if args.dry_run:
        return Plan(
            torch.device("cpu"),
            dry_unet,
            8,
            8,
            tuple(args.batches or (1, 2)),
            tuple(args.variants),
            tuple(args.setups),
            1,
            1,
            "eager",
            args.budget_s,
        )
    return Plan(
        torch.device("cuda"),
        bench.sd15_unet,
        LATENT,
        TEXT_TOKENS,
        tuple(args.batches or (4, 16)),
        tuple(args.variants),
        tuple(args.setups),
        args.steps,
        args.warmup,
        args.compile_backend,
        args.budget_s,
    )


def sdxl_plan(args: argparse.Namespace) -> Plan:
    """The SDXL rows: 1024 px, batch 1 and 4 (dry run: the narrow UNet at 64 px, batches 1 and 2)."""
    dry = args.dry_run
    return Plan(
        torch.device("cpu" if dry else "cuda"),
        dry_sdxl_unet if dry else sdxl_unet,
        8 if dry else SDXL_LATENT,
        8 if dry else TEXT_TOKENS,
        tuple(args.batches or ((1, 2) if dry else (1, 4))),
        tuple(args.variants),
        tuple(args.setups),
        1 if dry else args.steps,
        1 if dry else args.warmup,
        "eager" if dry else args.compile_backend,
        args.budget_s,
        "SDXL",
    )


def backbone(unet: nn.Module, plan: Plan, batch: int, seed: int = 0) -> bench.Backbone:
    """Random latents, text embeddings and conditions of one batch on the plan's device."""
    generator = torch.Generator().manual_seed(seed)
    side, device = plan.latent, plan.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device)

    latents, text = rand(batch, 4, side, side), rand(batch, plan.text_tokens, unet.config.cross_attention_dim)
    return bench.Backbone(
        name="gpu",
        description=f"{plan.name}-architecture UNet, batch {batch} at {side * 8} px",
        unet=unet,
        scheduler=bench.DDPMScheduler(**json.loads((bench.SD15 / "scheduler_config.json").read_text())),
        encode=lambda: (latents, text),
        condition=torch.rand(batch, 3, side * 8, side * 8, generator=generator).to(device),
        noise=rand(batch, 4, side, side),
        timesteps=torch.randint(0, 1000, (batch,), generator=generator).to(device),
    )


def trained_modules(setup: bench.Setup, unet: nn.Module) -> list[nn.Module]:
    """The UNet (copy) a setup runs, and for ControlNet its trainable copy too."""
    if "controlnet" in setup.modules:
        return [unet, setup.modules["controlnet"]]
    return [setup.modules["unet"]]


def compile_transformer_blocks(module: nn.Module, backend: str) -> None:
    """Regional compilation: ``torch.compile`` of every ``BasicTransformerBlock`` (diffusers'
    ``compile_repeated_blocks``, which ``ControlNetModel`` does not declare)."""
    for block in module.modules():
        if type(block).__name__ == "BasicTransformerBlock":
            block.compile(backend=backend)


def build(name: str, variant: str, base: nn.Module, plan: Plan) -> tuple[bench.Setup, nn.Module]:
    """One setup on a structural copy of the frozen UNet, with the variant applied and bf16 autocast."""
    if variant == "compile":
        # Dynamo's caches are per code object (BasicTransformerBlock.forward) and shared by every setup:
        # start each compiled configuration afresh, with room for one entry per block shape and stride.
        torch._dynamo.reset()
        torch._dynamo.config.recompile_limit = max(
            torch._dynamo.config.recompile_limit, COMPILE_RECOMPILE_LIMIT
        )
    unet = bench.structural_copy(base)
    setup = bench.SETUPS[name](unet)
    for module in trained_modules(setup, unet):
        module.to(plan.device)
        if variant == "grad_ckpt":
            module.enable_gradient_checkpointing()
        if variant == "compile":
            compile_transformer_blocks(module, plan.compile_backend)
    for module in setup.modules.values():
        module.to(plan.device)
    setup.optimizer = torch.optim.AdamW(setup.trainable.values(), lr=bench.LR)  # after the move
    predict = setup.predict

    def predict_bf16(*inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(plan.device.type, dtype=torch.bfloat16):
            return predict(*inputs)

    return dataclasses.replace(setup, predict=predict_bf16), unet


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(name: str, variant: str, batch: int, base: nn.Module, plan: Plan) -> dict:
    """Warm-up and timed steps of one configuration; peak GPU memory over them."""
    data = backbone(base, plan, batch)
    cuda = plan.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(plan.device)
        torch.cuda.reset_peak_memory_stats(plan.device)
    started = time.perf_counter()
    setup, _ = build(name, variant, base, plan)
    for _ in range(plan.warmup + (1 if variant == "compile" else 0)):
        bench.train_step(data, setup)
    _sync(plan.device)
    warm_s = time.perf_counter() - started
    times = []
    for _ in range(plan.steps):
        start = time.perf_counter()
        bench.train_step(data, setup)
        _sync(plan.device)
        times.append(time.perf_counter() - start)
    result = dict(
        setup=name,
        variant=variant,
        batch=batch,
        step_s=statistics.median(times),
        times=times,
        warmup_s=warm_s,
        trainable=setup.trainable_count,
    )
    if cuda:
        peak = torch.cuda.max_memory_allocated(plan.device)
        result.update(peak_gib=peak / 2**30, adds_gib=(peak - before) / 2**30)
    del setup, data
    gc.collect()
    return result


def schedule(plan: Plan) -> list[tuple[str, int, str]]:
    """(variant, batch, setup) in priority order: plain, then gradient checkpointing (small batch first),
    then compile (large batch first: each compiled configuration costs its compilation), the floor first."""

    def batches(variant: str) -> list[int]:
        return sorted(plan.batches, reverse=variant == "compile")

    return [(v, b, s) for v in plan.variants for b in batches(v) for s in plan.setups]


def run_all(
    plan: Plan, base: nn.Module, started: float, log: Callable[[str], None] = print
) -> tuple[list, list]:
    results, skipped, interrupted = [], [], [False]
    for variant, batch, name in schedule(plan):
        if interrupted[0]:
            skipped.append((name, variant, batch, "interrupted (timeout)"))
            continue
        if time.perf_counter() - started > plan.budget_s:
            skipped.append((name, variant, batch, "time budget"))
            continue
        try:
            row = run_one(name, variant, batch, base, plan)
        except KeyboardInterrupt:  # gpu.sh's timeout sends SIGINT: keep and print what was measured
            interrupted[0] = True
            skipped.append((name, variant, batch, "interrupted (timeout)"))
            continue
        except Exception as error:  # an OOM or a compile failure loses one row, not the table
            why = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}"
            skipped.append((name, variant, batch, why))
            log(f"[{variant}, batch {batch}] {name}: failed, {why}")
            if plan.device.type == "cuda":
                torch.cuda.empty_cache()
            gc.collect()
            continue
        results.append(row)
        log(
            f"[{variant}, batch {batch}] {name}: {row['step_s'] * 1e3:.1f} ms (warm-up {row['warmup_s']:.1f} s)"
        )
    return results, skipped


def ratio(results: list[dict], row: dict, reference: str) -> str:
    same = [
        r
        for r in results
        if (r["setup"], r["variant"], r["batch"]) == (reference, row["variant"], row["batch"])
    ]
    return f"{row['step_s'] / same[0]['step_s']:.2f}x" if same else "-"


def table(results: list[dict], skipped: list[tuple]) -> str:
    lines = [
        "| variant | batch | setup | median step (ms) | vs floor | vs ControlNet | peak GPU memory (GiB) | "
        "step adds (GiB) | warm-up (s) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        memory = f"{r['peak_gib']:.1f} | {r['adds_gib']:.1f}" if "peak_gib" in r else "- | -"
        lines.append(
            f"| {r['variant']} | {r['batch']} | {r['setup']} | {r['step_s'] * 1e3:.1f} | "
            f"{ratio(results, r, bench.FLOOR)} | {ratio(results, r, 'ControlNet')} | {memory} | {r['warmup_s']:.1f} |"
        )
    lines += [f"- skipped {name} ({variant}, batch {batch}): {why}" for name, variant, batch, why in skipped]
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--batches", type=lambda s: [int(b) for b in s.split(",")], help="default 4,16 (dry: 1,2)"
    )
    parser.add_argument("--backbone", choices=["sd15", "sdxl"], default="sd15", help="sdxl: the SDXL rows")
    parser.add_argument(
        "--variants", type=lambda s: s.split(","), default=None, help="default all (sdxl: no compile)"
    )
    parser.add_argument("--setups", type=lambda s: s.split(";"), default=None, help="';'-separated names")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps (one more under compile)")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting runs after this")
    parser.add_argument("--dry-run", action="store_true", help="CPU, narrow UNet, batches 1 and 2, 1+1 steps")
    parser.add_argument(
        "--quick", action="store_true", help="as --dry-run (for `python -m benchmarks --quick`)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads")
    parser.add_argument("--no-write", action="store_true", help="print only, leave README.md alone")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    args.dry_run = args.dry_run or args.quick
    sdxl = args.backbone == "sdxl"
    args.variants = args.variants or list(SDXL_VARIANTS if sdxl else VARIANTS)
    args.setups = args.setups or list(SDXL_SETUPS if sdxl else SETUPS)
    unknown = sorted(set(args.setups) - set(bench.SETUPS)) + sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown setup(s)/variant(s) {unknown}; setups: {SETUPS}, variants: {list(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.dry_run or torch.cuda.is_available()):
        print(
            "benchmarks.gpu: no CUDA device here, nothing measured (run benchmarks/gpu.sh on a GPU machine)"
        )
        return 0
    plan = make_plan(args)
    torch.manual_seed(0)
    base = plan.unet().to(plan.device)
    results, skipped = run_all(plan, base, started)
    command = " ".join(["python -m benchmarks.gpu", *(sys.argv[1:] if argv is None else argv)])
    device = torch.cuda.get_device_name(plan.device) if plan.device.type == "cuda" else "CPU (dry run)"
    body = (
        f"Measured {datetime.date.today().isoformat()} with `{command}` on {device} (torch {torch.__version__}, "
        f"{readme.cpu_model()}), {plan.steps} timed steps after {plan.warmup} warm-up steps (one more under "
        f"compile), bf16 autocast, {time.perf_counter() - started:.0f} s in all.\n\n{table(results, skipped)}"
    )
    print(body)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "skipped": skipped}, indent=1))
    if plan.device.type == "cuda" and not args.no_write:
        markers = (SDXL_START, SDXL_END) if plan.name == "SDXL" else (START, END)
        readme.write_section(body, readme.README, *markers)
    return 0


if __name__ == "__main__":
    from benchmarks.gpu import main as _main  # the importable module, as the other scripts do

    sys.exit(_main())

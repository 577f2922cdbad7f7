"""Forward+backward time of one OFT layer against a frozen layer, peft's OFT and peft's LoRA.

    python -m benchmarks.oft_layer [--repeats 30] [--quick] [--no-write] [--threads N]

Every step runs ``y = layer(x); y.backward(g)`` with a frozen base and an input that requires grad (as
inside a network). Variants run interleaved (A, B, C, ..., A, B, C, ...) so that load from other
processes hits all of them alike; we report the median time and the median of the per-round ratios
to the frozen layer. Memory: bytes of the tensors autograd saves for backward (captured with
``torch.autograd.graph.saved_tensors_hooks``), deduplicated by storage and excluding storages that
existed before the step (weights, parameters, the input): the activation memory a layer adds to a
network's training peak. The table is rewritten in benchmarks/README.md between its markers.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from benchmarks import readme
from benchmarks.readme import machine, write_section
from src.oft import OFTConfig, OFTConv2d, OFTLinear

README = readme.README
START, END = "<!-- oft_layer:start -->", "<!-- oft_layer:end -->"
BLOCK = 32


def oft_config(cayley: str) -> OFTConfig:
    return OFTConfig(block_size=BLOCK, cayley=cayley, target_modules=[".*"])


def peft_layer(base: nn.Module, kind: str) -> nn.Module | None:
    """The tuner layer peft puts around ``base`` (OFT with its defaults at block size 32, or LoRA r=16)."""
    try:
        import peft
    except ImportError:
        return None
    if kind == "oft":
        config = peft.OFTConfig(r=0, oft_block_size=BLOCK, target_modules=["0"])
    else:
        config = peft.LoraConfig(r=16, lora_alpha=16, target_modules=["0"])
    model = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)), config)
    return model.base_model.model[0]


def variants(base: nn.Module) -> dict[str, nn.Module]:
    """Name -> layer; the first is the frozen reference."""
    base.requires_grad_(False)
    wrap = OFTLinear if isinstance(base, nn.Linear) else OFTConv2d
    kind = "Linear" if isinstance(base, nn.Linear) else "Conv2d"
    layers: dict[str, nn.Module | None] = {f"frozen nn.{kind}": base}
    layers[f"OFT{kind} (Neumann, default)"] = wrap(base, oft_config("neumann"))
    layers[f"OFT{kind} (exact Cayley)"] = wrap(base, oft_config("exact"))
    if wrap is OFTLinear:
        layers["OFTLinear (input-centric, Neumann)"] = OFTLinear(base, oft_config("neumann"), impl="input")
    layers["peft OFT (block 32, Neumann)"] = peft_layer(base, "oft")
    layers["peft LoRA (r=16)"] = peft_layer(base, "lora")
    for layer in layers.values():
        if layer is not None and hasattr(layer, "oft_skew"):
            with torch.no_grad():
                layer.oft_skew.normal_(std=1e-3)  # a non-trivial rotation; speed does not depend on it
    return {name: layer for name, layer in layers.items() if layer is not None}


def step_fn(layer: nn.Module, x: Tensor, grad: Tensor) -> Callable[[], float]:
    """One timed forward+backward; clears gradients first (outside the timing)."""
    params = [p for p in layer.parameters() if p.requires_grad]

    def step() -> float:
        x.grad = None
        for p in params:
            p.grad = None
        start = time.perf_counter()
        layer(x).backward(grad)
        return time.perf_counter() - start

    return step


def saved_bytes(layer: nn.Module, x: Tensor) -> int:
    """Bytes autograd saves for backward in one forward, new storages only (see module docstring)."""
    existing = {t.untyped_storage().data_ptr() for t in [x, *layer.parameters(), *layer.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in existing:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(seen.values())


def run_case(layers: dict[str, nn.Module], x: Tensor, repeats: int, warmup: int) -> list[dict]:
    """Interleaved timing; returns one row per variant."""
    grad = torch.randn_like(layers[next(iter(layers))](x).detach())
    steps = {name: step_fn(layer, x, grad) for name, layer in layers.items()}
    times: dict[str, list[float]] = {name: [] for name in layers}
    for round_ in range(warmup + repeats):
        for name, step in steps.items():
            elapsed = step()
            if round_ >= warmup:
                times[name].append(elapsed)
    ref = times[next(iter(layers))]
    return [
        {
            "name": name,
            "ms": 1e3 * statistics.median(ts),
            "ratio": statistics.median(t / r for t, r in zip(ts, ref, strict=True)),
            "saved_mib": saved_bytes(layers[name], x) / 2**20,
        }
        for name, ts in times.items()
    ]


def table(title: str, rows: list[dict]) -> str:
    lines = [
        f"**{title}**",
        "",
        "| variant | median fwd+bwd (ms) | median ratio vs frozen | saved for backward (MiB) |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {r['name']} | {r['ms']:.1f} | {r['ratio']:.2f}x | {r['saved_mib']:.1f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per variant (default 30)")
    parser.add_argument("--quick", action="store_true", help="small shapes and 3 rounds, for a smoke run")
    parser.add_argument("--no-write", action="store_true", help="print only, leave README.md alone")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    repeats, warmup = (3, 1) if args.quick else (args.repeats, 3)
    d, tokens, hw = (128, 512, 16) if args.quick else (640, 8192, 64)
    linear_rows = run_case(
        variants(nn.Linear(d, d)), torch.randn(tokens, d, requires_grad=True), repeats, warmup
    )
    conv_x = torch.randn(1, 320, hw, hw, requires_grad=True)
    conv_rows = run_case(variants(nn.Conv2d(320, 320, 3, padding=1)), conv_x, repeats, warmup)
    command = "python -m benchmarks.oft_layer" + (" --quick" if args.quick else f" --repeats {repeats}")
    command += f" --threads {args.threads}" if args.threads else ""
    section = "\n\n".join(
        [
            f"Measured {datetime.date.today().isoformat()} with `{command}` on {machine()} "
            f"(torch {torch.__version__}, torch threads: {torch.get_num_threads()}), "
            f"{repeats} interleaved rounds after {warmup} warm-up rounds, block size {BLOCK}.",
            table(f"Linear {d}->{d}, {tokens} tokens", linear_rows),
            table(f"Conv2d 3x3, 320->320 channels, 1x320x{hw}x{hw}", conv_rows),
        ]
    )
    print(section)
    if not args.no_write and not args.quick:
        write_section(section, README, START, END)
    return section


if __name__ == "__main__":
    main()

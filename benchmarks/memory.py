"""Peak memory and time of one training step on a random-weight SD1.5 UNet, per memory switch and OFT preset.

    python -m benchmarks.memory [--repeats 2] [--threads N] [--no-write] [--quick]

One training step is what `OFTControlModule.training_step` does after the frozen encoders: the control
encoder on a 512 px condition, injected at `conv_in`; the OFT-adapted UNet (built from the public SD1.5
config in `src/models/sd15/unet_config.json`, random weights, fp32) on 64x64 latents with a 77-token text
embedding, batch 1; MSE loss, backward, AdamW step over the trainable tensors and the COFT projection.

Every configuration runs in a fresh subprocess so its peak resident set size (`ru_maxrss`, the kernel's
own high-water mark for that process) is not polluted by the others. We also report the RSS after the
model is built (weights + OFT + optimizer, before any step), so `peak - model` is what the step adds:
activations, gradients, optimizer state and transient buffers. Steps: one warm-up (its memory counts
towards the peak) and `--repeats` timed ones; the table shows the median. The text encoder's forward is
timed separately to decide whether caching caption embeddings pays off. `--quick` runs a tiny UNet to
smoke-test the script and never writes the README.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.readme import README, machine, write_section

START, END = "<!-- memory:start -->", "<!-- memory:end -->"
SD15 = Path(__file__).resolve().parents[1] / "src" / "models" / "sd15"
CONF = Path(__file__).resolve().parents[1] / "conf"
QUICK_UNET = dict(
    block_out_channels=[32, 64],
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    sample_size=8,
)


@dataclass(frozen=True)
class Case:
    """One configuration, run in its own process."""

    oft: str
    gradient_checkpointing: bool = False
    channels_last: bool = False

    @property
    def label(self) -> str:
        switches = [
            s
            for s, on in (("grad ckpt", self.gradient_checkpointing), ("channels-last", self.channels_last))
            if on
        ]
        return f"OFT `{self.oft}`" + (" + " + " + ".join(switches) if switches else "")


CASES = [Case("fast"), Case("fast", True), Case("paper"), Case("paper", True)]


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    """This process's high-water mark in bytes (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _oft_config(preset: str):
    """The project's own preset (conf/oft/<preset>.yaml, defaults resolved by Hydra)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"oft={preset}"])
    return instantiate(cfg.oft, _convert_="all")


def _unet_config(quick: bool) -> dict:
    config = json.loads((SD15 / "unet_config.json").read_text())
    return config | QUICK_UNET if quick else config


def run_case(case: Case, repeats: int, quick: bool) -> dict:
    """Build the adapted UNet and control encoder, then time `1 + repeats` training steps (worker side)."""
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel

    from src.models.control import ControlEncoder, control_injection
    from src.models.memory import MemoryOptions, apply_memory_options
    from src.oft import inject_oft, oft_parameter_count, project_coft_

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**_unet_config(quick)).requires_grad_(False)
    adapted = inject_oft(unet, _oft_config(case.oft))
    encoder = ControlEncoder(unet.config.block_out_channels[0], 8)
    options = MemoryOptions(case.gradient_checkpointing, case.channels_last)
    apply_memory_options(options, unet, [encoder])
    unet.train()
    trainable = [p for m in (unet, encoder) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    side = 8 if quick else 64
    latents, noise = torch.randn(2, 1, 4, side, side).unbind(0)
    text = torch.randn(1, 77, unet.config.cross_attention_dim)
    condition = torch.rand(1, 3, side * 8, side * 8)
    timesteps = torch.tensor([500])
    model_rss = _rss()

    def step() -> float:
        start = time.perf_counter()
        with control_injection(unet, encoder, condition):
            prediction = unet(latents + noise, timesteps, text).sample
        F.mse_loss(prediction, noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        project_coft_(unet)
        return time.perf_counter() - start

    times = [step() for _ in range(1 + repeats)]
    return dict(
        case=asdict(case),
        label=case.label,
        adapted_layers=len(adapted),
        oft_dof=oft_parameter_count(unet),
        frozen_params=sum(p.numel() for p in unet.parameters() if not p.requires_grad),
        model_rss=model_rss,
        peak_rss=_peak_rss(),
        first_step_s=times[0],
        step_s=statistics.median(times[1:]),
    )


def run_text_encoder(repeats: int, quick: bool) -> dict:
    """Time the frozen CLIP text encoder (SD1.5 config) on 77-token captions, batch 1 and 16 (worker side)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    config = json.loads((SD15 / "text_encoder_config.json").read_text())
    if quick:
        config |= dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(**config)).eval()
    result = {}
    for batch in (1, 16):
        tokens = torch.randint(0, config["vocab_size"], (batch, 77))
        times = []
        with torch.no_grad():
            for _ in range(1 + repeats):
                start = time.perf_counter()
                model(tokens)
                times.append(time.perf_counter() - start)
        result[f"batch_{batch}_s"] = statistics.median(times[1:])
    return result


def spawn(kind: str, payload: dict, repeats: int, threads: int, quick: bool) -> dict:
    """Run one worker in a fresh interpreter and return its JSON result."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.memory",
        "--worker",
        kind,
        "--payload",
        json.dumps(payload),
        "--repeats",
        str(repeats),
        "--threads",
        str(threads),
    ] + (["--quick"] if quick else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    errors = []
    for _ in range(2):  # one retry, reported in the table
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1])
        if not done.returncode:
            return json.loads(done.stdout.strip().splitlines()[-1]) | {"retried_after": errors}
        errors.append(
            done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        )
        print(f"worker {kind} {payload} failed: {errors[-1]}", file=sys.stderr, flush=True)
    raise RuntimeError(f"worker {kind} {payload} failed twice:\n{done.stderr[-3000:]}")


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f}"


INTRO = """## Memory and speed switches: one SD1.5 training step on CPU

`benchmarks/memory.py` runs one training step of OFT-Control on a random-weight UNet built from the
public SD1.5 config (`src/models/sd15/unet_config.json`, 860M frozen parameters, fp32) at 64x64 latents
(512 px), batch 1, with the control encoder injected at `conv_in`: forward, MSE loss, backward, AdamW
step and COFT projection, for the `fast` and `paper` OFT presets (`conf/oft/*.yaml`) with and without
UNet gradient checkpointing (`module.memory.gradient_checkpointing=true`). Each configuration runs in a
fresh process: "model RSS" is its resident memory once weights, rotations and optimizer exist, "peak RSS"
the kernel's high-water mark (`ru_maxrss`) over one warm-up and the timed steps, "step adds" their
difference (activations, gradients, optimizer state, transient buffers). Times are medians of the timed
steps after the warm-up; the frozen CLIP text encoder is timed separately to decide whether caching
caption embeddings pays off."""


def _row(r: dict) -> str:
    return (
        f"| {r['label']} | {r['oft_dof']:,} | {_gb(r['model_rss'])} | {_gb(r['peak_rss'])} | "
        f"{_gb(r['peak_rss'] - r['model_rss'])} | {r['step_s']:.1f} | {r['first_step_s']:.1f} |"
    )


def findings(results: list[dict], text: dict) -> list[str]:
    """What the numbers say about checkpointing and a text-embedding cache."""
    by_case = {tuple(r["case"].values())[:2]: r for r in results}
    lines = []
    for preset in ("fast", "paper"):
        plain, ckpt = by_case.get((preset, False)), by_case.get((preset, True))
        if plain and ckpt:
            adds = [r["peak_rss"] - r["model_rss"] for r in (plain, ckpt)]
            lines.append(
                f"- `{preset}`: gradient checkpointing cuts what the step adds from {_gb(adds[0])} to "
                f"{_gb(adds[1])} GB ({100 * (1 - adds[1] / adds[0]):.0f}% less; peak {_gb(plain['peak_rss'])} -> "
                f"{_gb(ckpt['peak_rss'])} GB) for a step time of {ckpt['step_s']:.1f} s vs {plain['step_s']:.1f} s."
            )
    fast = by_case.get(("fast", False), results[0])
    share = 100 * text["batch_1_s"] / fast["step_s"]
    lines.append(
        f"- Text encoder (SD1.5 CLIP text tower, 77 tokens, no grad): {text['batch_1_s']:.2f} s at batch 1, "
        f"{share:.1f}% of the `fast` step ({text['batch_16_s']:.2f} s at batch 16). A cache of caption "
        "embeddings could save at most that share (half of it for the empty caption that caption dropout "
        "makes frequent), so it is not implemented."
    )
    return lines


def table(results: list[dict], text: dict) -> str:
    """The section body: what is measured, the table, the findings."""
    lines = [
        INTRO,
        "",
        "| configuration | OFT dof | model RSS (GB) | peak RSS (GB) | step adds (GB) | step (s) | first step (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *(_row(r) for r in results),
        "",
        *findings(results, text),
        f"- Frozen UNet parameters: {results[0]['frozen_params']:,}; adapted layers: {results[0]['adapted_layers']}.",
    ]
    lines += [
        f"- {r['label']} failed once and was rerun: `{e}`"
        for r in results
        for e in r.get("retried_after", [])
    ]
    return "\n".join(lines)


def where(threads: int) -> str:
    import torch

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{machine()}, OMP_NUM_THREADS={threads}, Python {platform.python_version()}, torch "
        f"{torch.__version__}; load average at the end {load} (the machine is shared: times are inflated, "
        "memory is not)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="tiny UNet smoke run; never writes the README")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave README.md alone")
    parser.add_argument("--worker", choices=["step", "text"], help=argparse.SUPPRESS)
    parser.add_argument("--payload", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # Threads come from OMP_NUM_THREADS (set by `spawn`). With torch 2.14.1's MKL, set_num_threads(n > 1)
    # makes batched torch.linalg.solve fail for blocks >= 160 ("lu_solve pivots"); the exact Cayley
    # transform no longer uses it (a Cholesky solve, src/oft/rotation.py), so either way works now.
    if args.worker == "step":
        print(json.dumps(run_case(Case(**json.loads(args.payload)), args.repeats, args.quick)))
        return
    if args.worker == "text":
        print(json.dumps(run_text_encoder(args.repeats, args.quick)))
        return
    results = []
    for case in CASES:
        results.append(spawn("step", asdict(case), args.repeats, args.threads, args.quick))
        print(
            f"{case.label}: {results[-1]['step_s']:.2f} s, peak {_gb(results[-1]['peak_rss'])} GB", flush=True
        )
    text = spawn("text", {}, args.repeats, args.threads, args.quick)
    command = "python -m benchmarks.memory" + (f" --repeats {args.repeats}" if args.repeats != 2 else "")
    body = (
        f"{table(results, text)}\n\nMeasured {datetime.date.today().isoformat()} with `{command}` on "
        f"{where(args.threads)}."
    )
    print(body)
    if not (args.quick or args.no_write):
        write_section(body, README, START, END)


if __name__ == "__main__":
    main()

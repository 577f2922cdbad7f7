"""The controllability race's report: reads each run's metrics and per-condition scores, writes the table and plots.

Every figure is the mean over conditions and seeds of a per-condition score at an evaluation (canny F1 of each
generated image against its condition; for segmentation the toy judge's shape mIoU of each image), with a
95% bootstrap interval: the 2.5th to 97.5th percentile of the means of ``RESAMPLES`` resamples of seeds and
conditions (with replacement, the same conditions for every seed). A difference is called only where two
intervals do not overlap; a row has plateaued when its second-last evaluation's mean is inside its last's interval."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from benchmarks import readme

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- controllability:start -->", "<!-- controllability:end -->"
CURVES_PLOT, LR_PLOT = "controllability_curves.png", "controllability_lr.png"
RESAMPLES = 2000
CAPTION = ("colour", "shape")  # caption accuracies logged by the controllability callback
VS = {None: "-", 1: "above", -1: "below", 0: "overlaps"}  # an interval against OFT-Control's
NAMES = {
    "oft_control": "OFT-Control",
    "encoder_only": "encoder only",
    "lora": "LoRA r=4",
    "full_finetune": "full finetune",
    "controlnet": "ControlNet",
    "t2i_adapter": "T2I-Adapter",
    "oft_more_layers": "OFT-Control, more layers",
    "oft_unshuffle": "OFT-Control, unshuffle encoder",
    "oft_unshuffle_more_layers": "OFT-Control, unshuffle encoder + more layers",
}
COLOR = {method: f"C{i}" for i, method in enumerate(NAMES)}  # one colour per method in every panel


# ---------------------------------------------------------------------------------------------- reading
def conditions(run_dir: Path) -> dict[int, dict]:
    """``{step: per-condition record}`` of a run (``conditions/step_*.json``)."""
    records = [json.loads(p.read_text()) for p in sorted((run_dir / "conditions").glob("step_*.json"))]
    return {r["step"]: r for r in records}


def last_conditions(run_dir: Path) -> dict:
    if not (found := conditions(run_dir)):
        raise FileNotFoundError(f"no per-condition scores under {run_dir / 'conditions'}")
    return found[max(found)]


def last_metrics(run_dir: Path) -> dict[str, float]:
    """The last logged value of every column of the run's ``csv/metrics.csv``."""
    last: dict[str, float] = {}
    with (run_dir / "csv" / "metrics.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            last |= {k: float(v) for k, v in row.items() if v and k not in ("step", "epoch")}
    return last


# ---------------------------------------------------------------------------------------------- statistics
def bootstrap(values: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """``(lo, mean, hi)``: the mean of ``values`` ``[seeds, conditions]`` and its 95% bootstrap interval over
    seeds and conditions (both drawn with replacement, the same conditions for every seed)."""
    values = np.asarray(values, dtype=float)
    seeds, count = values.shape
    rng = np.random.default_rng(seed)
    rows, cols = rng.integers(0, seeds, (resamples, seeds)), rng.integers(0, count, (resamples, count))
    means = values[rows[:, :, None], cols[:, None, :]].mean(axis=(1, 2))
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(values.mean()), float(hi)


def separated(a: tuple[float, float, float], b: tuple[float, float, float]) -> int:
    """1 where interval ``a`` lies wholly above ``b``, -1 wholly below, 0 where they overlap."""
    return 1 if a[0] > b[2] else -1 if a[2] < b[0] else 0


def plateaued(previous: tuple[float, float, float], last: tuple[float, float, float]) -> bool:
    """The second-last evaluation's mean inside the last's interval."""
    return last[0] <= previous[1] <= last[2]


def _ci(x: tuple[float, float, float]) -> str:
    return f"{x[1]:.3f} [{x[0]:.3f}, {x[2]:.3f}]"


# ---------------------------------------------------------------------------------------------- rows
def rows(race: dict, out: Path) -> list[dict]:
    """One row per (task, method) whose every seed is reported: the reported runs' intervals at every
    evaluation and what they logged."""
    from benchmarks.controllability import SCORE

    table = []
    for row in race["rows"]:
        runs = sorted(_runs(race, row, "report"), key=lambda r: r["seed"])
        if {r["seed"] for r in runs} != set(race["protocol"]["seeds"]):  # pending: render names it
            continue
        name = SCORE[row["task"]]
        per_seed = [conditions(out / r["dir"]) for r in runs]
        steps = sorted(set.intersection(*(set(c) for c in per_seed)))
        curve = {s: bootstrap(np.array([c[s][name] for c in per_seed])) for s in steps}
        logged = [last_metrics(out / r["dir"]) for r in runs]
        grid = sorted(lr for lr, _ in row["scores"])
        found = dict(task=row["task"], method=row["method"], lr=row["chosen"], grid=grid, seeds=len(runs))
        found |= dict(inside=grid[0] < row["chosen"] < grid[-1], selection=row["scores"], curve=curve)
        found |= dict(final=curve[steps[-1]], conditions=len(per_seed[0][steps[-1]][name]))
        last = [c[steps[-1]] for c in per_seed]
        found["chance"] = bootstrap(np.array([c[f"{name}_chance"] for c in last]))
        found["caption"] = [bootstrap(np.array([c[f"caption_{k}_acc"] for c in last])) for k in CAPTION]
        found["plateau"] = len(steps) > 1 and plateaued(curve[steps[-2]], curve[steps[-1]])
        shared = [k for k in logged[0] if all(k in m for m in logged)]
        found["logged"] = {k: float(np.mean([m[k] for m in logged])) for k in shared}
        found["logged_range"] = {k: (min(m[k] for m in logged), max(m[k] for m in logged)) for k in shared}
        table.append(found)
    for row in table:
        reference = next((r for r in table if (r["task"], r["method"]) == (row["task"], "oft_control")), row)
        row["vs_oft"] = None if reference is row else separated(row["final"], reference["final"])
    return table


def _runs(race: dict, row: dict, phase: str) -> list[dict]:
    key = (row["task"], row["method"], phase)
    return [r for r in race["runs"] if (r["task"], r["method"], r["phase"]) == key]


def adapter_checks(race: dict, out: Path) -> list[str]:
    """Lines: per method, the selection score with one lr against the adapter at lr / f and lr * f."""
    from benchmarks.controllability import SCORE

    lines = []
    for row in race["rows"]:
        runs = [r for r in _runs(race, row, "adapter") if not r.get("failed")]
        single, checks = [r for r in runs if not r["adapter_lr"]], [r for r in runs if r["adapter_lr"]]
        if not checks or not single:
            continue
        scores = [np.array([last_conditions(out / r["dir"])[SCORE[row["task"]]]]) for r in [*single, *checks]]
        base, *others = (bootstrap(s) for s in scores)
        better = any(separated(ci, base) > 0 for ci in others)
        cells = [f"adapter lr {r['adapter_lr']:.3g}: {_ci(ci)}" for r, ci in zip(checks, others, strict=True)]
        verdict = "a separate adapter lr is better" if better else "one lr loses nothing"
        head = f"- {NAMES[row['method']]} ({row['task']}), lr {row['chosen']:.3g}: one lr {_ci(base)}; "
        lines.append(head + "; ".join(cells) + f": {verdict}")
    return lines


# ---------------------------------------------------------------------------------------------- faithfulness
def faithfulness(toy_unet_config: Path | None = None) -> list[dict]:
    """SD1.5 with the paper preset, the toy backbone as the previous protocol set it, and as the race sets it
    (``toy_rule``): UNet size, encoder share, rotation share, block sizes and the COFT bound."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding

    from benchmarks.controllability import SD15_ENCODER, toy_rule
    from benchmarks.train_step import oft_preset
    from src.models.control import ControlEncoder
    from src.oft import inject_oft, oft_layers, oft_parameter_count

    toy_config = toy_unet_config or ROOT / "assets" / "toy-sd" / "unet" / "config.json"
    rule = toy_rule()
    setups = (
        ("SD1.5, paper preset", ROOT / "src" / "models" / "sd15" / "unet_config.json", "paper", SD15_ENCODER),
        ("toy, previous protocol", toy_config, "paper", SD15_ENCODER),
        ("toy, this race (rule)", toy_config, "toy_paper", tuple(rule["encoder_channels"])),
    )
    found = []
    for label, config_path, preset, channels in setups:
        config = json.loads(Path(config_path).read_text())
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
            unet_params = sum(p.numel() for p in unet.parameters())
            width = config["block_out_channels"][0]
            encoder = sum(p.numel() for p in ControlEncoder(width, 8, channels).parameters())
            hint = ControlNetConditioningEmbedding(width, block_out_channels=tuple(channels))
            inject_oft(unet, oft_preset(preset))
        layers = [layer for _, layer in oft_layers(unet)]
        rotations = oft_parameter_count(unet)
        radii = [layer.coft_radius for layer in layers]
        angles = [math.degrees(2 * math.atan(radius / math.sqrt(2))) for radius in radii]
        blocks, share = sorted({x.block_size for x in layers}), rotations / (rotations + encoder)
        row = dict(setup=label, unet=unet_params, encoder=encoder, encoder_share=encoder / unet_params)
        row |= dict(hint=sum(p.numel() for p in hint.parameters()), rotations=rotations, rotation_share=share)
        row["blocks"] = blocks
        found.append(row | dict(radius=(min(radii), max(radii)), angle=(min(angles), max(angles))))
    return found


def faithfulness_table(found: list[dict]) -> str:
    lines = ["| | " + " | ".join(f["setup"] for f in found) + " |", "|---|" + "---:|" * len(found)]
    cells = {
        "UNet parameters": lambda f: f"{f['unet'] / 1e6:.1f}M",
        "control encoder (share of UNet)": lambda f: f"{f['encoder']:,} ({100 * f['encoder_share']:.2f}%)",
        "ControlNet hint block": lambda f: f"{f['hint']:,}",
        "rotation DOF (share of trainable)": lambda f: (
            f"{f['rotations']:,} ({100 * f['rotation_share']:.0f}%)"
        ),
        "block sizes": lambda f: ", ".join(map(str, f["blocks"])),
        "COFT radius eps b^2 / sqrt(r)": lambda f: f"{f['radius'][0]:.3g} to {f['radius'][1]:.3g}",
        "largest plane angle COFT allows": lambda f: f"{f['angle'][0]:.1f} to {f['angle'][1]:.1f} deg",
    }
    lines += [f"| {name} | " + " | ".join(cell(f) for f in found) + " |" for name, cell in cells.items()]
    return "\n".join(lines)


def _movement(logged: dict, spread: dict) -> str:
    """Max Q/radius, mean ||R - I|| and max angle at the last evaluation: seeds' mean [lowest, highest]."""
    keys = [f"oft/{k}" for k in ("q_over_radius_max", "rotation_distance", "plane_angle_max_deg")]
    if keys[0] not in logged:
        return "-"
    formats = dict(zip(keys, (".2f", ".3g", ".1f"), strict=True))
    cells = (f"{logged[k]:{f}} [{spread[k][0]:{f}}, {spread[k][1]:{f}}]" for k, f in formats.items())
    return " / ".join(cells) + " deg"


def table(found: list[dict]) -> str:
    lines = [
        "| task | method | lr (grid) | score [95% interval] @ each evaluation | final | chance | plateau | vs OFT-Control | caption colour / shape | max Q/radius / mean R-I / max angle |",
        "|---|---|---|---|---|---:|---|---|---|---|",
    ]
    for r in found:
        grid = ", ".join(f"{lr:.2g}" for lr in r["grid"])
        edge = " **at the grid's edge**" * (not r["inside"])
        curve = ", ".join(f"{_ci(v)} @{s}" for s, v in r["curve"].items())
        logged, caption = r["logged"], " / ".join(map(_ci, r["caption"]))
        lines.append(
            f"| {r['task']} | {NAMES[r['method']]} | {r['lr']:.2g} ({grid}){edge} | {curve} | {_ci(r['final'])} | "
            f"{_ci(r['chance'])} | {'yes' if r['plateau'] else 'no'} | {VS[r['vs_oft']]} | {caption} | {_movement(logged, r['logged_range'])} |"
        )
    return "\n".join(lines)


def verdict(found: list[dict]) -> Iterator[str]:
    """Per task: the best OFT-Control row (`oft_*`) against every peer: margins of means; does it win?"""
    for task in dict.fromkeys(r["task"] for r in found):
        ours = [r for r in found if r["task"] == task and r["method"].startswith("oft_")]
        peers = [r for r in found if r["task"] == task and r not in ours]
        if not ours or not peers:
            continue
        top = max(ours, key=lambda r: r["final"][1])
        best = top["final"]
        vs = {NAMES[p["method"]]: (best[1] - p["final"][1], separated(best, p["final"])) for p in peers}
        said = ", ".join(f"{name} {margin:+.3f} ({VS[s]})" for name, (margin, s) in vs.items())
        end = "it wins" if min(s for _, s in vs.values()) > 0 else "no win: not above every peer, separated"
        yield f"- {task}: the best OFT-Control row, {NAMES[top['method']]} {_ci(best)}, against {said}; {end}."


def render(race: dict, found: list[dict], faith: list[dict], checks: list[str]) -> str:
    p = race["protocol"]
    minutes, reused = race["seconds"] / 60, sum(r.get("reused", False) for r in race["runs"])
    runs = len(race["runs"])
    resumed = f" (resumed: {reused} of its {runs} runs from an earlier invocation)" if reused else ""
    head = (
        f"Measured {race['date']} with `{race['command']}` in {minutes:.1f} minutes{resumed} on {readme.machine()} "
        f"({race['jobs']} runs at a time, one torch thread each). Batch {p['batch_size']}, {p['steps']} steps "
        f"(evaluations every {p['eval_every']}), seeds {', '.join(map(str, p['seeds']))}, "
        f"{found[0]['conditions'] if found else 0} reported conditions per seed; lr chosen after "
        f"{p['select_steps']} steps of the {'reported' if p['select_steps'] == p['steps'] else 'same, scaled'} "
        f"schedule (cosine decay to 0; seed 0) on as many disjoint selection conditions, grid extended by "
        f"x{p['factor']:.3g} while its best is at an end. Scores: canny F1 / "
        "toy-judge shape mIoU per condition, mean [95% bootstrap interval over conditions and seeds]; rotation movement at the "
        "last evaluation, mean over seeds [lowest, highest seed] (`oft/q_over_radius_max`, "
        "`oft/rotation_distance`, `oft/plane_angle_max_deg`)."
    )
    shown = {(r["task"], r["method"]) for r in found}
    pending = [
        f"{NAMES[r['method']]} ({r['task']})" for r in race["rows"] if (r["task"], r["method"]) not in shown
    ]
    parts = [head, "", table(found)]
    parts += (
        ["", f"Not reported yet (the race resumes where it stopped): {', '.join(pending)}."]
        if pending
        else []
    )
    so_far = " Over the rows reported so far only." if pending else ""
    parts += ["", f"Does OFT-Control win (margins of means, final evaluation)?{so_far}", ""]
    parts += [*verdict(found), "", "SD1.5 against the toy backbone:", "", faithfulness_table(faith)]
    note = f"One lr for the encoder and the adapter ({p.get('adapter_steps', 300)} steps, selection conditions, seed 0):"
    parts += ["", note, "", *checks] if checks else []
    parts += ["", f"![score vs step]({CURVES_PLOT})", f"![selection score vs lr]({LR_PLOT})"]
    return "\n".join(parts)


def plot(race: dict, found: list[dict], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curves(ax, task: str) -> None:
        for r in (r for r in found if r["task"] == task):
            steps, (lo, mid, hi) = list(r["curve"]), np.array(list(r["curve"].values())).T
            ax.plot(steps, mid, marker="o", label=NAMES[r["method"]], color=COLOR[r["method"]])
            ax.fill_between(steps, lo, hi, alpha=0.2, color=COLOR[r["method"]])
        if chance := [r["chance"][1] for r in found if r["task"] == task]:  # none: no row reported yet
            ax.axhline(float(np.mean(chance)), color="grey", ls="--", label="chance (mean)")
        ax.set(title=f"{task}: reported conditions (95% interval)", xlabel="step", ylabel="score")

    def lrs(ax, task: str) -> None:
        for row in (row for row in race["rows"] if row["task"] == task):
            points = [(lr, score) for lr, score in row["scores"] if math.isfinite(score)]  # failed: -inf
            xs, ys = zip(*points, strict=True) if points else ((), ())
            (line,) = ax.plot(xs, ys, marker="o", label=NAMES[row["method"]], color=COLOR[row["method"]])
            if (chosen := row["chosen"]) is not None:
                ax.plot([chosen], [dict(row["scores"])[chosen]], "*", ms=14, color=line.get_color())
        ax.set(xscale="log", title=f"{task}: lr selection (star: chosen)", xlabel="lr", ylabel="score")

    tasks = list(dict.fromkeys(r["task"] for r in race["rows"]))
    paths = [folder / CURVES_PLOT, folder / LR_PLOT]
    for path, draw in zip(paths, (curves, lrs), strict=True):
        figure, axes = plt.subplots(1, len(tasks), figsize=(8.5 * len(tasks), 4), squeeze=False)
        for ax, task in zip(axes[0], tasks, strict=True):
            draw(ax, task)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
        figure.tight_layout()
        figure.savefig(path, dpi=100)
    plt.close("all")
    return paths


def report(race: dict, out: Path, write: bool = False) -> dict:
    """Rows, markdown and plots of a finished race; with ``write``, into benchmarks/README.md and beside it."""
    found = rows(race, out)
    faith = faithfulness()
    markdown = render(race, found, faith, adapter_checks(race, out))
    plots = plot(race, found, Path(__file__).parent if write else out)
    if write:
        readme.write_section(markdown, start=START, end=END)
    (out / "report.md").write_text(markdown + "\n")
    return {"rows": found, "faithfulness": faith, "markdown": markdown, "plots": plots, "race": race}

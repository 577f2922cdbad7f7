"""Several conditions on the toy world: one jointly trained model, and two single-condition runs composed.

    python -m benchmarks.multi_condition [--quick] [--no-write] [--jobs 2] [--out DIR] [--seeds 0 1]

OFT-Control runs through ``python -m src.train`` in the race's setting (``experiment=race``: the toy backbone,
the SD1.5 presets carried over by the race's rule, batch 8, cosine decay to 0 over the run, clipping at 1),
with checkpoints kept, all on the same toy-world shards holding both members (``data_prep.demo`` task
``canny+seg``: 16,384 training scenes, validation shards of 64): canny alone and segmentation alone at the lrs
the race chose for OFT-Control, and both jointly (``task=canny_segmentation``, each condition dropped
independently) with its lr and condition dropout chosen here by the race's rule: every candidate is trained
to the reported horizon (seed 0) and scored with both conditions on the 64 selection conditions
(``val-000000``, disjoint from the reported ones), each condition's metric as a fraction of its single run's
on the same conditions, and the largest smaller fraction wins. First the lr at dropout 0.3, on a
quarter-decade grid starting at the two single lrs' geometric mean and its neighbours, extended until the
winner is inside it; then the dropouts ``DROPOUTS`` at that lr. The composition's rotation scale per run
(``+rotation_scale.<condition>``, ``ROTATION_SCALES`` each) is chosen by the same rule on the same conditions.

Every model of each seed then draws the race's 64 reported conditions (``val-000001``; DDIM 20, guidance 9,
seed 0): each single run from its own condition, the joint model from both and from each alone, and the
composition of the two single runs of a seed (``src.models.multi.compose_runs``, at the chosen rotation
scales and, where those differ from 1, as trained) from both. Scores per
condition: canny F1 of the image against the target's edges and the toy judge's shape mIoU, with 95%
bootstrap intervals over seeds and conditions.

Disagreement: each condition's edges paired with the next condition's segmentation (another scene); with
canny at strength 1 the segmentation's strength goes from 0 to 2, and the plot shows the canny F1 against
the edges' scene and the mIoU against the segmentation's scene, for the joint and the composed model.

Writes its section of benchmarks/README.md, ``multi_condition_grid.png`` (canny | segmentation | joint |
composed | target) and ``multi_condition_disagreement.png``. ``--quick``: the same steps in-process on a tiny
protocol, writing nothing here.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import readme
from benchmarks.controllability import QUICK_OVERRIDES, ROOT, train_inline
from benchmarks.race_report import bootstrap

DEFAULT_OUT = ROOT / "outputs" / "multi_condition"
START, END = "<!-- multi_condition:start -->", "<!-- multi_condition:end -->"
TASKS = {"canny": "canny", "seg": "segmentation", "joint": "canny_segmentation"}
DROPOUT = 0.3  # module.condition_dropout's default (conf/train.yaml)
# the joint run's dropouts tried at its chosen lr; at least 0.05, so that each condition is also trained alone
DROPOUTS = (0.05, 0.1, 0.2, DROPOUT, 0.5)
# the composition's rotation scales tried per run (`+rotation_scale.<condition>`: 1 as trained, 0 encoder only)
ROTATION_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)
STRENGTHS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)  # the segmentation's, canny at 1, in the disagreement plot
SAMPLING = dict(scheduler="ddim", num_inference_steps=20, guidance_scale=9.0, seed=0, batch_size=16)
KEEP_CHECKPOINTS = (
    "trainer.enable_checkpointing=true",
    "callbacks.checkpoint={_target_: pytorch_lightning.callbacks.ModelCheckpoint, "
    "dirpath: '${paths.output_dir}/checkpoints', save_last: true, save_top_k: 0}",
)


def overrides(run: str, lr: float, seed: int, steps: int, quick: bool, dropout: float = DROPOUT) -> list[str]:
    """``src.train`` overrides of one run: the race's setting on the two-member shards."""
    shards = "${data.root}/canny+seg"
    return [
        "experiment=race",
        f"task={TASKS[run]}",
        "method=oft_control",
        f"optim.lr={lr!r}",
        f"seed={seed}",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        f"callbacks.energy.every_n_steps={steps}",
        f"data.train_shards={shards}/train-*.tar",
        f"data.val_shards={shards}/val-000001.tar",
        "data.prepare.task=canny+seg",
        *KEEP_CHECKPOINTS,
        *([f"module.condition_dropout={dropout}"] if run == "joint" else []),
        *(QUICK_OVERRIDES.split() + ["data.batch_size=2"] if quick else ["data.batch_size=8"]),
    ]


def race_lrs(race: Path, default: float) -> dict[str, float]:
    """OFT-Control's lr as the race chose it for canny and for segmentation (``race.json``); ``default`` where
    the race has no choice."""
    chosen = {}
    if (race / "race.json").is_file():
        rows = json.loads((race / "race.json").read_text())["rows"]
        chosen = {r["task"]: r["chosen"] for r in rows if r["method"] == "oft_control" and r["chosen"]}
    return {"canny": chosen.get("canny", default), "seg": chosen.get("segmentation", default)}


def folder_name(run: str, seed: int, lr: float, dropout: float = DROPOUT) -> str:
    """A run's folder: the single runs have one lr each, the joint runs one folder per lr and dropout tried."""
    if run != "joint":
        return f"{run}-lr{lr:.3g}_s{seed}"  # the lr too: a race that chose again does not reuse it
    return f"joint-lr{lr:.3g}" + (f"-drop{dropout:g}" if dropout != DROPOUT else "") + f"_s{seed}"


def single_folders(lrs: dict[str, float]) -> tuple[str, str]:
    """Seed 0's canny and segmentation runs: the selection's reference scores."""
    return folder_name("canny", 0, lrs["canny"]), folder_name("seg", 0, lrs["seg"])


def train_all(out: Path, jobs: list[tuple], steps: int, args: argparse.Namespace) -> None:
    """Train every (run, seed, lr[, condition dropout]) of ``jobs`` not yet finished, ``--jobs`` processes at a
    time (in-process with --quick)."""
    pending = [job for job in jobs if not (out / folder_name(*job) / "checkpoints" / "last.ckpt").is_file()]
    args.trained = getattr(args, "trained", 0) + len(pending)
    running: list[tuple[subprocess.Popen, str]] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            run, seed, lr, *dropout = pending.pop(0)
            folder = out / folder_name(run, seed, lr, *dropout)
            folder.mkdir(parents=True, exist_ok=True)
            command = overrides(run, lr, seed, steps, args.quick, *dropout) + [f"threads={args.threads}"]
            if args.quick:
                train_inline(command, folder)
                continue
            log = (folder / "train.log").open("w")
            process = subprocess.Popen(
                [sys.executable, "-m", "src.train", *command, f"hydra.run.dir={folder}"],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            running.append((process, folder.name))
        for process, name in list(running):
            if process.poll() is not None:
                running.remove((process, name))
                if process.returncode:
                    raise RuntimeError(
                        f"run {name} failed ({process.returncode}); see {out / name / 'train.log'}"
                    )
                print(f"[multi] {name} trained", flush=True)
        time.sleep(0.5 if running else 0)


class SelectionScores:
    """Mean scores of models on the selection conditions, cached by key in ``selection.json``: one draw per
    model and conditions given, however many of its metrics are asked for."""

    def __init__(self, out: Path, inputs: list, sampling: dict) -> None:
        self.file, self.sampling = out / "selection.json", sampling
        self.cache = json.loads(self.file.read_text()) if self.file.is_file() else {}
        self.conditions = torch.stack([item.condition for item in inputs])  # [N, 6, H, W]: canny, seg
        self.targets = torch.stack([item.target for item in inputs])
        self.prompts = [item.caption for item in inputs]

    def means(self, keys: dict[str, str], source, condition, strength) -> dict[str, float]:
        """``{metric: mean}`` for ``keys`` (``{metric: cache key}``); a missing key draws ``source`` (a run, or
        runs with their rotation scales as ``(runs, scales)``) once from ``condition`` at ``strength``."""
        from src.models.inference import load_controlled

        if any(key not in self.cache for key in keys.values()):
            runs, scales = source if isinstance(source, tuple) else (source, None)
            model = load_controlled(runs, rotation_scale=scales)
            images = draw(model, condition, self.prompts, strength, self.sampling)
            found = scores(images, self.targets, sorted({metric.split("_")[0] for metric in keys}))
            self.cache.update({key: float(np.mean(found[metric])) for metric, key in keys.items()})
            self.file.write_text(json.dumps(self.cache, indent=1))
        return {metric: self.cache[key] for metric, key in keys.items()}


def select_joint(
    out: Path, lrs: dict[str, float], steps: int, args: argparse.Namespace, selection: SelectionScores
) -> tuple[tuple[float, float], list[dict]]:
    """The joint run's (lr, condition dropout), seed 0 at the reported horizon, scored on the selection
    conditions against the single runs there (the module docstring): first the lr at the default dropout, the
    grid growing by a quarter decade on the side of a winner at its edge (at most ``--max-extend`` times); then
    the dropouts ``DROPOUTS`` at that lr."""
    conditions = selection.conditions

    def rows_of(points: list[tuple[float, float]]) -> list[dict]:
        train_all(out, [("joint", 0, lr, dropout) for lr, dropout in points], steps, args)
        rows = []
        for lr, dropout in points:
            name = folder_name("joint", 0, lr, dropout)
            both = {m: f"{name}:{m}" for m in single}
            found = selection.means(both, out / name, conditions, {"canny": 1.0, "seg": 1.0})
            ratios = {m: found[m] / single[m] if single[m] else float("nan") for m in single}
            ratio_columns = {f"{m}_ratio": r for m, r in ratios.items()}
            # each condition alone, for the table (not the rule): does the subset work?
            alone = {
                f"{m}_alone": selection.means({m: f"{name}:{m}@{c}"}, out / name, conditions, {c: 1.0})[m]
                / single[m]
                if single[m]
                else math.nan
                for c, m in (("canny", "canny_f1"), ("seg", "seg_miou"))
            }
            rows.append({"lr": lr, "dropout": dropout, **found, **ratio_columns, **alone, "single": single})
            rows[-1]["score"] = min(ratios.values())
        return rows

    train_all(out, [("canny", 0, lrs["canny"]), ("seg", 0, lrs["seg"])], steps, args)
    canny, seg = single_folders(lrs)
    single = {
        **selection.means({"canny_f1": canny}, out / canny, conditions[:, :3], 1.0),
        **selection.means({"seg_miou": seg}, out / seg, conditions[:, 3:], 1.0),
    }
    step = 10**0.25
    grid = [math.sqrt(lrs["canny"] * lrs["seg"]) * step**k for k in (-1, 0, 1)]
    for extended in range(args.max_extend + 1):
        rows = rows_of([(lr, DROPOUT) for lr in grid])
        best = max(range(len(grid)), key=lambda i: rows[i]["score"])
        if best not in (0, len(grid) - 1) or extended == args.max_extend:
            break
        grid = [grid[0] / step] + grid if best == 0 else grid + [grid[-1] * step]
    lr = grid[best]
    rows += rows_of([(lr, dropout) for dropout in DROPOUTS if dropout != DROPOUT])
    chosen = max(rows, key=lambda row: row["score"] if row["lr"] == lr else -math.inf)
    return (chosen["lr"], chosen["dropout"]), rows


def select_composition(
    out: Path, lrs: dict[str, float], selection: SelectionScores
) -> tuple[dict[str, float], dict[tuple[float, float], float]]:
    """The composition's rotation scale per run, chosen on the selection conditions by the joint run's rule
    (seed 0, both conditions, the smaller fraction of the single runs' scores there); every pair of
    ``ROTATION_SCALES``. Returns the chosen ``{condition: scale}`` and each pair's smaller fraction."""
    canny, seg = single_folders(lrs)
    runs = [str(out / canny), str(out / seg)]
    single = {"canny_f1": selection.cache[canny], "seg_miou": selection.cache[seg]}
    fractions = {}
    for pair in itertools.product(ROTATION_SCALES, repeat=2):
        keys = {
            m: f"composed-rc{pair[0]:g}-rs{pair[1]:g}:{m}"
            for m in (*single, "canny_f1_chance", "seg_miou_chance")
        }
        source = (runs, dict(zip(("canny", "seg"), pair, strict=True)))
        found = selection.means(keys, source, selection.conditions, {"canny": 1.0, "seg": 1.0})
        fractions[pair] = min(found[m] / single[m] for m in single)
    best = max(fractions, key=fractions.get)
    return dict(zip(("canny", "seg"), best, strict=True)), fractions


# ------------------------------------------------------------------------------------------------ scoring
def scores(
    images: torch.Tensor, targets: torch.Tensor, conditions=("canny", "seg")
) -> dict[str, list[float]]:
    """Per condition: canny F1 against the target's edges and/or the toy judge's shape mIoU (with chance)."""
    from src.callbacks.controllability import per_condition_scores
    from src.metrics.base import to_uint8

    generated, wanted = to_uint8(images), to_uint8(targets)
    return {k: v for c in conditions for k, v in per_condition_scores(generated, wanted, c).items()}


def draw(model, conditions: torch.Tensor, prompts: list[str], strength, sampling: dict) -> torch.Tensor:
    from src.models.inference import generate_images
    from src.models.sampling import SamplingOptions

    options = SamplingOptions(**sampling, strength=strength)
    return generate_images(model, conditions, prompts, options)[:, 0]


def evaluate_seed(
    out: Path, seed: int, lrs: dict[str, float], dropout: float, scales: dict, inputs: list, sampling: dict
) -> dict:
    """Every model of one seed on the reported conditions, and the disagreement sweep; the composition at the
    chosen rotation ``scales`` (and as trained, where those differ)."""
    from src.models.inference import load_controlled

    conditions = torch.stack([item.condition for item in inputs])  # [N, 6, H, W]: canny, seg
    targets = torch.stack([item.target for item in inputs])
    prompts = [item.caption for item in inputs]
    canny, seg = conditions[:, :3], conditions[:, 3:]
    runs = {name: out / folder_name(name, seed, lrs[name], dropout) for name in TASKS}
    images, result = {}, {}
    images["canny alone"] = draw(load_controlled(runs["canny"]), canny, prompts, 1.0, sampling)
    images["seg alone"] = draw(load_controlled(runs["seg"]), seg, prompts, 1.0, sampling)
    joint = load_controlled(runs["joint"])
    images["joint, both"] = draw(joint, conditions, prompts, {"canny": 1.0, "seg": 1.0}, sampling)
    images["joint, canny only"] = draw(joint, conditions, prompts, {"canny": 1.0}, sampling)
    images["joint, seg only"] = draw(joint, conditions, prompts, {"seg": 1.0}, sampling)
    both = {"canny": 1.0, "seg": 1.0}
    if set(scales.values()) != {1.0}:
        as_trained = load_controlled([str(runs["canny"]), str(runs["seg"])])
        images["composed, both, rotations as trained"] = draw(as_trained, conditions, prompts, both, sampling)
    composed = load_controlled([str(runs["canny"]), str(runs["seg"])], rotation_scale=scales)
    images["composed, both"] = draw(composed, conditions, prompts, both, sampling)
    result["scores"] = {name: scores(batch, targets) for name, batch in images.items()}
    # disagreement: edges of scene i with the segmentation of scene i + 1
    other = torch.roll(torch.arange(len(inputs)), -1)
    mixed = torch.cat([canny, seg[other]], dim=1)
    sweep: dict[str, dict[str, list]] = {}
    for name, model in (("joint", joint), ("composed", composed)):
        sweep[name] = {"canny_f1": [], "seg_miou": []}
        for strength in STRENGTHS:
            drawn = draw(model, mixed, prompts, {"canny": 1.0, "seg": strength}, sampling)
            sweep[name]["canny_f1"].append(scores(drawn, targets, ["canny"])["canny_f1"])
            sweep[name]["seg_miou"].append(scores(drawn, targets[other], ["seg"])["seg_miou"])
    result["disagreement"] = sweep
    result["grid"] = [conditions[:6, :3], conditions[:6, 3:], images["joint, both"][:6]]
    result["grid"] += [images["composed, both"][:6], targets[:6]]
    return result


# ------------------------------------------------------------------------------------------------ report
def ci(values: list[list[float]]) -> tuple[float, float, float]:
    return bootstrap(np.asarray(values, dtype=float))


def fmt(x: tuple[float, float, float]) -> str:
    return f"{x[1]:.3f} [{x[0]:.3f}, {x[2]:.3f}]"


def table(per_seed: list[dict]) -> tuple[str, dict]:
    """The markdown table and each row's intervals; ratios are to the single run of the same condition."""
    names = list(per_seed[0]["scores"])
    found = {
        name: {m: ci([s["scores"][name][m] for s in per_seed]) for m in ("canny_f1", "seg_miou")}
        for name in names
    }
    chance = {
        m: ci([s["scores"]["joint, both"][f"{m}_chance"] for s in per_seed]) for m in ("canny_f1", "seg_miou")
    }
    single = {"canny_f1": found["canny alone"]["canny_f1"][1], "seg_miou": found["seg alone"]["seg_miou"][1]}
    lines = [
        "| model (conditions given) | canny F1 | vs canny alone | shape mIoU | vs seg alone |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        row = found[name]
        ratio = {m: row[m][1] / single[m] if single[m] else float("nan") for m in single}
        lines.append(
            f"| {name} | {fmt(row['canny_f1'])} | {ratio['canny_f1']:.0%} | {fmt(row['seg_miou'])} | "
            f"{ratio['seg_miou']:.0%} |"
        )
    lines.append(
        f"| chance (each image against the other conditions) | {fmt(chance['canny_f1'])} | | "
        f"{fmt(chance['seg_miou'])} | |"
    )
    return "\n".join(lines), {"rows": found, "chance": chance, "single": single}


def plots(per_seed: list[dict], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import save_image

    from src.grids import image_grid

    grid = folder / "multi_condition_grid.png"
    save_image(image_grid(*per_seed[0]["grid"]), grid)
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for ax, metric, title in zip(
        axes,
        ("canny_f1", "seg_miou"),
        ("canny F1 vs the edges' scene", "shape mIoU vs the segmentation's scene"),
        strict=True,
    ):
        for name, style in (("joint", "-o"), ("composed", "--s")):
            stats = [
                ci([s["disagreement"][name][metric][i] for s in per_seed]) for i in range(len(STRENGTHS))
            ]
            mean = [x[1] for x in stats]
            ax.errorbar(
                STRENGTHS,
                mean,
                yerr=[
                    [m - x[0] for m, x in zip(mean, stats, strict=True)],
                    [x[2] - m for m, x in zip(mean, stats, strict=True)],
                ],
                fmt=style,
                capsize=3,
                label=name,
            )
        ax.set_xlabel("segmentation strength (canny at 1)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    figure.tight_layout()
    disagreement = folder / "multi_condition_disagreement.png"
    figure.savefig(disagreement, dpi=100)
    plt.close("all")
    return [grid, disagreement]


def selection_table(rows: list[dict], chosen: tuple[float, float]) -> str:
    """The joint run's selection: each (lr, dropout)'s scores on the selection conditions, as fractions of the
    single runs' there."""
    single = rows[0]["single"]
    lines = [
        f"| joint lr | condition dropout | canny F1 (canny alone {single['canny_f1']:.3f}) | shape mIoU (seg "
        f"alone {single['seg_miou']:.3f}) | smaller fraction | canny only | seg only |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        mark = " (chosen)" if (row["lr"], row["dropout"]) == chosen else ""
        lines.append(
            f"| {row['lr']:.3g}{mark} | {row['dropout']:g} | {row['canny_f1']:.3f} ({row['canny_f1_ratio']:.0%}) | "
            f"{row['seg_miou']:.3f} ({row['seg_miou_ratio']:.0%}) | {row['score']:.0%} | "
            f"{row['canny_f1_alone']:.0%} | {row['seg_miou_alone']:.0%} |"
        )
    return "\n".join(lines)


def composition_table(fractions: dict[tuple[float, float], float], chosen: dict[str, float]) -> str:
    """The smaller fraction of each pair of rotation scales (rows: canny's, columns: segmentation's)."""
    lines = [
        "| canny's rotation scale | " + " | ".join(f"seg {s:g}" for s in ROTATION_SCALES) + " |",
        "|---" * (len(ROTATION_SCALES) + 1) + "|",
    ]
    best = (chosen["canny"], chosen["seg"])
    for c in ROTATION_SCALES:
        cells = [
            f"**{fractions[c, s]:.0%}**" if (c, s) == best else f"{fractions[c, s]:.0%}"
            for s in ROTATION_SCALES
        ]
        lines.append(f"| {c:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(per_seed: list[dict], markdown: str, info: dict, meta: dict, selected: list[dict]) -> str:
    single, rows = info["single"], info["rows"]
    joint = {m: rows["joint, both"][m][1] / single[m] for m in single}
    composed = {m: rows["composed, both"][m][1] / single[m] for m in single}
    verdict = (
        f"Joint / single: canny {joint['canny_f1']:.0%}, segmentation {joint['seg_miou']:.0%} (target at least "
        f"90% each); composed (rotation scale canny {meta['scales']['canny']:g}, segmentation "
        f"{meta['scales']['seg']:g}) / single: canny {composed['canny_f1']:.0%}, segmentation "
        f"{composed['seg_miou']:.0%} (target at least 80% each)."
    )
    return "\n".join(
        [
            "## Several conditions at once",
            "",
            f"Measured {meta['date']} with `{meta['command']}` in {meta['minutes']:.0f} minutes on {meta['machine']}, "
            f"which reused {meta['runs'] - meta['trained']} of its {meta['runs']} training runs from earlier "
            f"invocations in the same folder and trained {meta['trained']}."
            if meta["trained"] < meta["runs"]
            else f"Measured {meta['date']} with `{meta['command']}` in {meta['minutes']:.0f} minutes on "
            f"{meta['machine']}.",
            f"{meta['steps']} steps per run at lr {meta['lrs']}, the joint run's condition dropout "
            f"{meta['joint'][1]:g} (canny and segmentation alone: the race's OFT-Control lrs; joint: chosen below), seeds "
            f"{meta['seeds']}, {meta['conditions']} reported conditions (the race's `val-000001`); intervals are "
            "95% bootstrap intervals over seeds and conditions.",
            "",
            "The joint run's lr and condition dropout, chosen like the race's lrs: seed 0 trained to the same "
            "horizon at each, scored with both conditions on the 64 selection conditions (`val-000000`, "
            "disjoint from the reported ones) as fractions of the single runs' scores there; the largest "
            "smaller fraction wins. First the lr at the default dropout 0.3 (the grid grows until its best is "
            "inside), then the dropout at that lr (at least 0.05, so that each condition is also trained alone). "
            "The last two columns give each candidate one condition alone, as a fraction of that condition's "
            "single run (shown, not part of the rule).",
            "",
            selection_table(selected, meta["joint"]),
            "",
            "The composition's rotation scale per run (`+rotation_scale.<condition>`: each run's Cayley "
            "generator scaled, so the product stays orthogonal; 1 is the rotation as trained, 0 the run's "
            "encoder alone), chosen by the same rule on the same selection conditions (seed 0, both "
            "conditions at strength 1); each cell is the smaller fraction:",
            "",
            composition_table(meta["fractions"], meta["scales"]),
            "",
            markdown,
            "",
            verdict,
            "",
            "![canny | segmentation | joint | composed | target](multi_condition_grid.png)",
            "",
            "When the conditions disagree (edges of one scene, segmentation of the next): which one the "
            "image follows as the segmentation's strength goes from 0 to 2, canny at 1 (means, 95% intervals).",
            "",
            "![disagreement](multi_condition_disagreement.png)",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a tiny protocol in-process; no README")
    parser.add_argument("--no-write", action="store_true", help="leave benchmarks/README.md and plots alone")
    parser.add_argument("--jobs", type=int, default=2, help="training runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", type=Path, default=None, help=f"runs folder (default {DEFAULT_OUT})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=3000, help="training steps per run (the race's horizon)")
    parser.add_argument(
        "--race", type=Path, default=ROOT / "outputs" / "race", help="the race whose lrs to use"
    )
    parser.add_argument("--lr", type=float, default=1e-2, help="lr of a run the race has no choice for")
    parser.add_argument(
        "--max-extend", type=int, default=3, help="grid extensions of the joint lr's selection (default 3)"
    )
    args = parser.parse_args(argv)
    steps, seeds = (2, [0]) if args.quick else (args.steps, args.seeds)
    out = args.out or (DEFAULT_OUT.with_name("multi_condition-quick") if args.quick else DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    lrs = race_lrs(args.race, args.lr)
    singles = [(run, seed, lrs[run]) for seed in seeds for run in ("canny", "seg")]
    train_all(out, singles, steps, args)  # and builds the shards
    from omegaconf import OmegaConf

    from src.data.inputs import collect_inputs

    root = OmegaConf.load(out / folder_name("canny", seeds[0], lrs["canny"]) / "config.yaml").data.root
    torch.set_num_threads(max(1, args.threads * args.jobs))
    sampling = SAMPLING | ({"num_inference_steps": 2} if args.quick else {})
    selection = SelectionScores(
        out, collect_inputs(f"{root}/canny+seg/val-000000.tar", "canny+seg", 64), sampling
    )
    (lrs["joint"], dropout), selected = select_joint(out, lrs, steps, args, selection)
    scales, fractions = select_composition(out, lrs, selection)
    train_all(out, [(run, seed, lrs[run], dropout) for seed in seeds for run in TASKS], steps, args)
    inputs = collect_inputs(f"{root}/canny+seg/val-000001.tar", "canny+seg", 64)
    per_seed = [evaluate_seed(out, seed, lrs, dropout, scales, inputs, sampling) for seed in seeds]
    markdown, info = table(per_seed)
    command = "python -m benchmarks.multi_condition" + (" --quick" if args.quick else "")
    command += "" if args.quick or seeds == [0, 1] else " --seeds " + " ".join(map(str, seeds))
    meta = dict(
        date=datetime.date.today().isoformat(),
        command=command,
        minutes=(time.monotonic() - started) / 60,
        machine=readme.machine(),
        steps=steps,
        lrs=", ".join(f"{name} {lr:.3g}" for name, lr in lrs.items()),
        seeds=seeds,
        conditions=len(inputs),
        joint=(lrs["joint"], dropout),
        scales=scales,
        fractions=fractions,
        trained=args.trained,
        runs=2 * len(seeds) + len(selected) + len(seeds) - 1,
    )
    text = render(per_seed, markdown, info, meta, selected)
    write = not (args.quick or args.no_write)
    paths = plots(per_seed, Path(__file__).parent if write else out)
    if write:
        readme.write_section(text, start=START, end=END)
    (out / "report.md").write_text(text + "\n")
    print(text)
    return {
        "markdown": text,
        "info": info,
        "per_seed": per_seed,
        "plots": paths,
        "selection": selected,
        "rotation_scales": scales,
        "lrs": lrs,
    }


if __name__ == "__main__":
    main()

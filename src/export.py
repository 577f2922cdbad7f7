"""Export a trained run for inference elsewhere.

    python -m src.export --run outputs/canny/runs/<date> --out_dir exports/canny [--formats peft]

writes one folder per format under `--out_dir` (default: every format the run's backbone can host; the
formats are described in `src.models.exported` and `src.formats`):

- `diffusers/`: a `StableDiffusionPipeline` folder with the rotations merged into the UNet (`W R`) and the
  control encoder in `control_encoder/`: `python -m src.generate run=exports/canny/diffusers ...` or
  `src.models.exported.load_exported`. `--run A B` composes runs on one backbone into this folder alone
  (`--rotation_scale canny=0.5` scales one run's rotations; 1 as trained, 0 its encoder only).
- `peft/`: the UNet rotations as a peft OFT adapter for the base UNet: `PeftModel.from_pretrained(
  UNet2DConditionModel.from_pretrained(base, subfolder="unet"), "exports/canny/peft")`.
- `control_encoder/`: the control encoder alone, `model.safetensors` plus `config.json`.
- `single_file/`: `model.safetensors` in the original SD (LDM) layout, rotations merged: a checkpoint for
  AUTOMATIC1111, Forge and ComfyUI; `config/` lets diffusers' `from_single_file` load it offline.
- `lora/`: `lora.safetensors`, the rotations as full weight differences (`lora_unet_<layer>.diff`) for the
  LoRA / LyCORIS loaders of those tools, applied to the base checkpoint.
- `controlnet_xs/`: the control encoder as a stock diffusers `ControlNetXSAdapter`, for
  `StableDiffusionControlNetXSPipeline` over `diffusers/` (backbones with layers_per_block 2 only).
- `hint_embedding/`: the control encoder as diffusers' `ControlNetConditioningEmbedding`, whose output a stock
  pipeline adds after `conv_in` with a forward hook (any backbone).
- `ecosystem/`: a run of another method (`method=controlnet`, `t2i_adapter`, `lora`, ...) in its own
  ecosystem's formats (`src.models.methods`): `controlnet/`, `t2i_adapter/`, `peft/`, `unet/`, each with
  `control_encoder/` where the method has one; the only format of those runs.
(Options are named as `src.generate`'s and `src.evaluate`'s keys: `--run`, `--checkpoint`, `--model_path`.)
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from src.errors import ConfigError, run_cli
from src.models.exported import FORMATS, WRITERS, export_composed, prepare_out_dir, unsupported
from src.models.run import load_run


def export(
    run: str | os.PathLike | Sequence[str],
    out_dir: str | os.PathLike,
    formats: Sequence[str] | None = None,
    checkpoint: str | None = None,
    model_path: str | None = None,
    overwrite: bool = False,
    report: Callable[[str], None] = print,
    rotation_scale: Mapping[str, float] | None = None,
) -> dict[str, Path]:
    """Export `run` (a run directory or checkpoint) to `out_dir/<format>` for each format; returns the folders.

    `formats=None` writes every format the backbone can host and `report`s the others with the reason; a
    format asked for by name that the backbone cannot host stops the export (one line) before any is written.
    Several runs compose, each run's rotation scaled by `rotation_scale` (by condition name).
    """
    runs, several = ([run], False) if isinstance(run, str | os.PathLike) else (list(run), len(run) > 1)
    if several and ((formats and set(formats) != {"diffusers"}) or checkpoint):
        raise ConfigError("several --run compose into one diffusers folder: drop --formats, --checkpoint")
    if rotation_scale and not several:
        raise ConfigError("--rotation_scale scales the runs of a composition: give several --run, or drop it")
    names = ["diffusers"] if several else list(formats or FORMATS)
    targets = prepare_out_dir(Path(out_dir).expanduser(), names, overwrite)
    if several:  # composed on their common backbone (src.models.multi)
        composed = [load_run(source, None, model_path) for source in runs]
        return {"diffusers": export_composed(composed, targets["diffusers"], rotation_scale)}
    trained = load_run(runs[0], checkpoint, model_path)
    reasons = {name: why for name in targets if (why := unsupported(trained, name))}
    if formats and reasons:
        name, why = next(iter(reasons.items()))
        raise ConfigError(f"--formats {name}: {why}")
    for name, why in reasons.items():
        if name != "ecosystem" or "ecosystem" in (formats or ()):  # OFT-Control's formats are the others
            report(f"{name}: skipped: {why}")
    return {name: WRITERS[name](trained, path) for name, path in targets.items() if name not in reasons}


def parse_assignment(item: str, flag: str) -> tuple[str, str]:
    """`NAME=VALUE` of a command-line flag (the value is checked where it is used)."""
    name, sep, value = item.partition("=")
    if not sep or not name or not value:
        raise ConfigError(f"{flag} {item!r}: write CONDITION=SCALE, e.g. {flag} canny=0.5")
    return name, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run",
        required=True,
        nargs="+",
        help="a run directory or one of its .ckpt files; several: composed into one diffusers folder",
    )
    parser.add_argument("--out_dir", required=True, help="folder that receives one subfolder per format")
    formats_help = "what to export (default: all the backbone hosts)"
    parser.add_argument("--formats", nargs="+", default=None, choices=FORMATS, help=formats_help)
    parser.add_argument("--checkpoint", default=None, help="a checkpoint other than checkpoints/last.ckpt")
    parser.add_argument(
        "--model_path", default=None, help="the frozen backbone's folder, if it moved since training"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing export folders")
    parser.add_argument(
        "--rotation_scale",
        nargs="+",
        default=[],
        metavar="CONDITION=SCALE",
        help="with several --run: scale a run's rotations (1: as trained, 0: its encoder only), e.g. canny=0.5",
    )
    parser.epilog = "Errors print one line (exit status 2); --debug shows the traceback."
    return parser


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """Entry point of `python -m src.export`."""
    args = build_parser().parse_args(argv)
    scales = dict(parse_assignment(item, "--rotation_scale") for item in args.rotation_scale)
    written = export(
        args.run, args.out_dir, args.formats, args.checkpoint, args.model_path, args.overwrite, print, scales
    )
    for name, path in written.items():
        print(f"{name}: {path}")
    return written


if __name__ == "__main__":
    run_cli(main)

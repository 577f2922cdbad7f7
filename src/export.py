"""Export a trained run for inference elsewhere.

    python -m src.export --run outputs/canny/runs/<date> --out_dir exports/canny [--formats peft]

writes one folder per format under `--out_dir` (default: all three; the formats are described in
`src.models.exported`):

- `diffusers/`: a `StableDiffusionPipeline` folder with the rotations merged into the UNet (`W R`) and the
  control encoder in `control_encoder/`: `python -m src.generate run=exports/canny/diffusers ...` or
  `src.models.exported.load_exported`.
- `peft/`: the UNet rotations as a peft OFT adapter for the base UNet: `PeftModel.from_pretrained(
  UNet2DConditionModel.from_pretrained(base, subfolder="unet"), "exports/canny/peft")`.
- `control_encoder/`: the control encoder alone, `model.safetensors` plus `config.json`.

The options are named as the keys of `python -m src.generate` and `python -m src.evaluate`: `--run`,
`--checkpoint`, `--model_path`, `--out_dir`.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from src.errors import ConfigError, OutputError, run_cli
from src.models.exported import FORMATS, WRITERS
from src.models.run import load_run


class ExportExistsError(OutputError, FileExistsError):
    """The export would overwrite earlier exports."""


def prepare_out_dir(out_dir: Path, formats: Sequence[str], overwrite: bool) -> dict[str, Path]:
    """Target folders per format; refuses to write into non-empty ones unless `overwrite`."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ConfigError(f"unknown export format(s) {unknown or formats}; choose from {', '.join(FORMATS)}")
    targets = {name: out_dir / name for name in formats}
    busy = [str(p) for p in targets.values() if p.exists() and any(p.iterdir())]
    if busy and not overwrite:
        raise ExportExistsError(
            f"export folder(s) {busy} are not empty: choose another --out_dir or pass --overwrite"
        )
    for path in targets.values():
        shutil.rmtree(path, ignore_errors=True)
    return targets


def export(
    run: str | os.PathLike,
    out_dir: str | os.PathLike,
    formats: Sequence[str] = FORMATS,
    checkpoint: str | None = None,
    model_path: str | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Export `run` (a run directory or checkpoint) to `out_dir/<format>` for each format; returns the folders."""
    targets = prepare_out_dir(Path(out_dir).expanduser(), list(formats), overwrite)
    trained = load_run(run, checkpoint, model_path)
    return {name: WRITERS[name](trained, path) for name, path in targets.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run",
        required=True,
        help="a training run directory (config.yaml, checkpoints/) or one of its .ckpt files",
    )
    parser.add_argument("--out_dir", required=True, help="folder that receives one subfolder per format")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS, help="what to export")
    parser.add_argument(
        "--checkpoint", default=None, help="a checkpoint other than <run>/checkpoints/last.ckpt"
    )
    parser.add_argument(
        "--model_path", default=None, help="the frozen backbone's folder, if it moved since training"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing export folders")
    parser.epilog = "Errors print one line (exit status 2); --debug shows the traceback."
    return parser


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """Entry point of `python -m src.export`."""
    args = build_parser().parse_args(argv)
    written = export(args.run, args.out_dir, args.formats, args.checkpoint, args.model_path, args.overwrite)
    for name, path in written.items():
        print(f"{name}: {path}")
    return written


if __name__ == "__main__":
    run_cli(main)

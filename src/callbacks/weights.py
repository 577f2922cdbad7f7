"""The trained tensors as safetensors beside every checkpoint: a few MB that anything can load safely."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from safetensors.torch import save_file

from src.errors import ConfigError
from src.fileio import atomic_path

STEP_FILE = re.compile(r"step_(\d+)\.safetensors")


def save_safetensors_atomic(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` as safetensors to a temporary file beside `path`, then rename it over `path`."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


def prune_step_files(folder: Path, keep_last: int) -> list[Path]:
    """Delete all but the `keep_last` newest `step_XXXXXX.safetensors` in `folder` (by step); return them."""
    steps = sorted(
        (int(m.group(1)), p) for p in folder.glob("step_*.safetensors") if (m := STEP_FILE.fullmatch(p.name))
    )
    doomed = [path for _, path in steps[: max(len(steps) - keep_last, 0)]]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


class SafetensorsWeights(pl.Callback):
    """On every checkpoint save, write its trained tensors to `<run>/<dirname>/step_XXXXXX.safetensors`
    and `last.safetensors`, with the checkpoint identity (backbone, OFT layout) as metadata.

    Args:
        dirname: folder under the run directory.
        keep_last: keep only this many `step_*` files (the newest; `last.safetensors` is always kept), as
            the checkpoint callback keeps its `.ckpt` files; `-1` keeps every one.
    """

    def __init__(self, dirname: str = "weights", keep_last: int = -1) -> None:
        if keep_last == 0 or keep_last < -1:
            raise ConfigError(f"keep_last {keep_last} must be >= 1, or -1 to keep every checkpoint")
        self.dirname, self.keep_last = dirname, keep_last

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not trainer.is_global_zero:
            return
        folder = Path(trainer.default_root_dir) / self.dirname
        tensors = pl_module.trained_state_dict()  # raises on non-finite weights before anything is written
        metadata = {k: str(v) for k, v in pl_module.checkpoint_identity().items()}
        metadata["global_step"] = str(trainer.global_step)
        save_safetensors_atomic(tensors, folder / f"step_{trainer.global_step:06d}.safetensors", metadata)
        save_safetensors_atomic(tensors, folder / "last.safetensors", metadata)
        if self.keep_last > 0:
            prune_step_files(folder, self.keep_last)

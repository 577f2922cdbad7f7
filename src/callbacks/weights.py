"""The trained tensors as safetensors beside every checkpoint: a few MB that anything can load safely."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from safetensors.torch import save_file

from src.fileio import atomic_path


def save_safetensors_atomic(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` as safetensors to a temporary file beside `path`, then rename it over `path`."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


class SafetensorsWeights(pl.Callback):
    """On every checkpoint save, write its trained tensors to `<run>/<dirname>/step_XXXXXX.safetensors`
    and `last.safetensors`, with the checkpoint identity (backbone, OFT layout) as metadata."""

    def __init__(self, dirname: str = "weights") -> None:
        self.dirname = dirname

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if not trainer.is_global_zero:
            return
        folder = Path(trainer.default_root_dir) / self.dirname
        tensors = pl_module.trained_state_dict()  # raises on non-finite weights before anything is written
        identity = pl_module.checkpoint_identity()
        metadata = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in identity.items()}
        metadata["global_step"] = str(trainer.global_step)
        save_safetensors_atomic(tensors, folder / f"step_{trainer.global_step:06d}.safetensors", metadata)
        save_safetensors_atomic(tensors, folder / "last.safetensors", metadata)

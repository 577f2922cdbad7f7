"""Checkpoint files that are either complete or absent: a kill during a save never corrupts `last.ckpt`."""

from __future__ import annotations

import os
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from src.fileio import atomic_path


def atomic_torch_save(payload: Any, path: str | os.PathLike) -> None:
    """`torch.save` to a temporary file in the target folder, fsync it, then rename it over `path`.

    Readers see the old checkpoint or the new one, never a partial write; a crash leaves at most a
    hidden `.tmp` file that is never mistaken for a checkpoint.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(payload, handle)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO for local paths, written atomically; loads stay `weights_only`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)
        return None

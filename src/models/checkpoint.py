"""Checkpoints: what they hold, the identity they must match to be loaded, and atomic writes.

A checkpoint of `python -m src.train` holds the trained tensors only (control encoder and rotations) in
`state_dict`, Lightning's loop and optimizer state, and under `checkpoint["oft_control"]` its identity:
the backbone's name and the layout of the rotations (`checkpoint_identity`). Resuming, rebuilding a run
and the module's own loading hook all compare identities with `check_identity`, which names every
field that differs. Files are written to a temporary file, fsynced and renamed, so a kill during a save
never corrupts `last.ckpt`; they are read with `weights_only=True` (nothing is unpickled).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from src.fileio import atomic_path
from src.models.backbone import BackboneSpec
from src.oft import OFTConfig

CHECKPOINT_META = "oft_control"
#: OFT settings that constrain training but do not change which tensors exist
UNCHECKED_OFT_FIELDS = ("eps", "coft")


class CheckpointMismatchError(ValueError):
    """A checkpoint was trained with another backbone or OFT layout than the one configured."""


def checkpoint_identity(backbone: BackboneSpec, oft: OFTConfig) -> dict[str, Any]:
    """What a checkpoint must match to be loaded: the backbone's name and the layout of the rotations."""
    layout = {k: v for k, v in dataclasses.asdict(oft).items() if k not in UNCHECKED_OFT_FIELDS}
    return {"backbone": backbone.name, "oft": layout}


def _fields(identity: Any) -> dict[str, Any]:
    """`{"backbone": ..., "oft.<field>": ...}` of an identity (empty for anything that is not one)."""
    if not isinstance(identity, Mapping):
        return {}
    oft = identity.get("oft")
    layout = {f"oft.{k}": v for k, v in oft.items()} if isinstance(oft, Mapping) else {"oft": oft}
    return {"backbone": identity.get("backbone"), **layout}


def check_identity(
    saved: Any, expected: Mapping[str, Any], source: str | os.PathLike, configured: str
) -> None:
    """Raise `CheckpointMismatchError` naming every field in which `saved` differs from `expected`.

    Args:
        saved: the identity stored in the checkpoint (`checkpoint["oft_control"]`).
        expected: `checkpoint_identity` of the configuration the checkpoint is loaded into.
        source: the checkpoint's path, for the message ("" if unknown).
        configured: what holds the configuration, for the message ("this run's config").
    """
    have, want = _fields(saved), _fields(expected)
    differences = [
        f"trained on {name} {have.get(name)!r} but {configured} says {want.get(name)!r}"
        for name in sorted(set(have) | set(want), key=lambda n: (n != "backbone", n))
        if have.get(name) != want.get(name)
    ]
    if differences:
        what = f"checkpoint '{source}'" if str(source) else "checkpoint"
        raise CheckpointMismatchError(
            f"{what} does not match {configured} ({'; '.join(differences)}): resume with the same model "
            "and oft settings, or pass a checkpoint of a run with this configuration"
        )


def check_checkpoint(path: str | os.PathLike, backbone: BackboneSpec, oft: OFTConfig) -> None:
    """Fail before any weights load if `path` is missing or was trained with another backbone or OFT layout."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"ckpt_path '{path}' does not exist: point it at <run>/checkpoints/last.ckpt")
    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(CHECKPOINT_META)
    check_identity(saved, checkpoint_identity(backbone, oft), path, "this run's config")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's tensors and identity, loaded with `weights_only=True` (never unpickles code)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if (
        not isinstance(checkpoint, dict)
        or "state_dict" not in checkpoint
        or CHECKPOINT_META not in checkpoint
    ):
        raise ValueError(
            f"'{path}' is not an OFT-Control checkpoint (no state_dict and '{CHECKPOINT_META}' identity): "
            "pass a .ckpt written by `python -m src.train`"
        )
    return checkpoint


def atomic_torch_save(payload: Any, path: str | os.PathLike) -> None:
    """`torch.save` to a temporary file in the target folder, fsync it, then rename it over `path`.

    Readers see the old checkpoint or the new one, never a partial write; a crash leaves at most a
    hidden `.tmp` file that is never mistaken for a checkpoint.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(payload, handle)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO for local paths, written atomically; loads stay `weights_only`."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)
        return None

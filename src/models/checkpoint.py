"""Checkpoints: what they hold, the identity they must match to be loaded, and atomic writes.

A checkpoint of `python -m src.train` holds the trained tensors only (control encoder and rotations) in
`state_dict`, Lightning's loop and optimizer state, and under `checkpoint["oft_control"]` its identity:
the backbone's name, the method (`method/` group: its name and the settings that decide its tensors), the
layout of the rotations (methods that rotate) and the task's condition (`checkpoint_identity`). A
checkpoint written before methods existed is an `oft_control` one.
Resuming, rebuilding a run and the module's own loading hook all compare identities with
`check_identity`, which names every field that differs; a checkpoint written before the condition was
part of the identity loads with a warning that its task cannot be checked. Files are written to a
temporary file, fsynced and renamed, so a kill during a save never corrupts `last.ckpt`; they are read
with `weights_only=True` (nothing is unpickled) through `load_checkpoint_file`, which turns a truncated or
corrupt file into one `CheckpointError` line (never torch's advice to load with `weights_only=False`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from src.errors import CheckpointError, MissingInputError
from src.fileio import atomic_path
from src.models.backbone import BackboneSpec
from src.oft import OFTConfig

if TYPE_CHECKING:
    from src.models.methods import Method

log = logging.getLogger(__name__)

CHECKPOINT_META = "oft_control"
#: OFT settings that constrain training but do not change which tensors exist
UNCHECKED_OFT_FIELDS = ("eps", "coft")
#: the identity field naming the task's condition (`task.condition`: canny, seg, landmarks)
CONDITION = "condition"
#: the identity field naming the method, and the method of identities that name none (written before methods)
METHOD, DEFAULT_METHOD = "method", "oft_control"


class CheckpointMismatchError(CheckpointError):
    """A checkpoint was trained with another backbone, method, OFT layout or task than the one configured."""


def checkpoint_identity(
    backbone: BackboneSpec, oft: OFTConfig, condition: str | None = None, method: Method | None = None
) -> dict[str, Any]:
    """What a checkpoint must match to be loaded: the backbone's name, the method (`None`: OFT-Control), the
    layout of the rotations (for methods with rotations) and (when known) the task's condition, i.e. the
    member its control was trained to read."""
    identity: dict[str, Any] = {"backbone": backbone.name}
    if method is None or method.rotations:
        identity["oft"] = {k: v for k, v in dataclasses.asdict(oft).items() if k not in UNCHECKED_OFT_FIELDS}
    identity[METHOD] = {"name": DEFAULT_METHOD} if method is None else method.identity(oft)
    if condition is not None:
        identity[CONDITION] = str(condition)
    return identity


def _fields(identity: Any) -> dict[str, Any]:
    """`{"backbone": ..., "method.<field>": ..., "oft.<field>": ..., "condition": ...}` of an identity (empty
    for a non-identity); an identity without a method is OFT-Control's (written before methods existed)."""
    if not isinstance(identity, Mapping):
        return {}
    oft = identity.get("oft")
    layout = {f"oft.{k}": v for k, v in oft.items()} if isinstance(oft, Mapping) else {"oft": oft}
    method = identity.get(METHOD) or {"name": DEFAULT_METHOD}
    methods = (
        {f"method.{k}": v for k, v in method.items()} if isinstance(method, Mapping) else {METHOD: method}
    )
    task = {CONDITION: identity[CONDITION]} if identity.get(CONDITION) is not None else {}
    return {"backbone": identity.get("backbone"), **methods, **layout, **task}


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
    what = f"checkpoint '{source}'" if str(source) else "checkpoint"
    if CONDITION in want and CONDITION not in have and have:
        log.warning(
            "%s predates task identities: it records no task, so it cannot be checked against %s's "
            "condition '%s'; make sure it was trained for that task",
            what,
            configured,
            want[CONDITION],
        )
        want.pop(CONDITION)
    if CONDITION not in want:  # a configuration that does not know its task checks no task
        have.pop(CONDITION, None)
    names = sorted(
        set(have) | set(want), key=lambda n: (n != CONDITION, n != "backbone", n != "method.name", n)
    )
    other_method = have.get("method.name") != want.get("method.name")
    if other_method:  # the settings of two different methods are not worth comparing
        names = [n for n in names if n == "method.name" or not n.startswith(("method.", "oft"))]
    differences = [
        f"trained on {name} {have.get(name)!r} but {configured} says {want.get(name)!r}"
        for name in names
        if have.get(name) != want.get(name)
    ]
    if differences:
        task = " (and the same task)" if have.get(CONDITION) != want.get(CONDITION) else ""
        method = f" and method={have.get('method.name')}" if other_method else ""
        raise CheckpointMismatchError(
            f"{what} does not match {configured} ({'; '.join(differences)}): resume with the same model "
            f"and oft settings{method}{task}, or pass a checkpoint of a run with this configuration"
        )


def load_checkpoint_file(path: str | os.PathLike, mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` that reports a missing, truncated or corrupt file as one
    `CheckpointError` line; torch's own message (which suggests `weights_only=False`, i.e. running
    whatever code the file holds) is never shown."""
    if not Path(path).is_file():
        raise MissingInputError(f"checkpoint '{path}' does not exist")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as error:
            if not mmap or "mmap can only be used" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # not a zip: say why below
    except Exception as error:  # any failure to parse the file means the same to the user
        unsafe = "Unsupported global" in str(error)  # a pickle of code objects, never loaded
        kind = "holds objects other than tensors" if unsafe else "is truncated or corrupt"
        raise CheckpointError(
            f"'{path}' is not a readable PyTorch checkpoint: it {kind} ({type(error).__name__}); "
            "pass a .ckpt written by `python -m src.train`, e.g. <run>/checkpoints/last.ckpt"
        ) from None


def check_checkpoint(
    path: str | os.PathLike,
    backbone: BackboneSpec,
    oft: OFTConfig,
    condition: str | None = None,
    method: Method | None = None,
) -> None:
    """Fail before any weights load if `path` is missing, unreadable, or was trained with another
    backbone, method, OFT layout or task."""
    if not Path(path).is_file():
        raise MissingInputError(f"ckpt_path '{path}' does not exist: point it at <run>/checkpoints/last.ckpt")
    checkpoint = load_checkpoint_file(path, mmap=True)
    saved = checkpoint.get(CHECKPOINT_META) if isinstance(checkpoint, dict) else None
    if saved is None:
        raise CheckpointError(
            f"ckpt_path '{path}' is not an OFT-Control checkpoint (no '{CHECKPOINT_META}' identity): "
            "pass a .ckpt written by `python -m src.train`"
        )
    check_identity(saved, checkpoint_identity(backbone, oft, condition, method), path, "this run's config")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's tensors and identity, loaded with `weights_only=True` (never unpickles code)."""
    checkpoint = load_checkpoint_file(path)
    if (
        not isinstance(checkpoint, dict)
        or "state_dict" not in checkpoint
        or CHECKPOINT_META not in checkpoint
    ):
        raise CheckpointError(
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

"""Run directories: writing a run's config, and rebuilding a trained `OFTControlModule` from one.

A run directory, as `python -m src.train` leaves it, holds `config.yaml` (the resolved config) and
`checkpoints/*.ckpt` (the trained tensors only, plus the run's identity under `checkpoint["oft_control"]`).
Rebuilding follows training exactly: the module is instantiated from `config.yaml` (backbone, method, OFT
layout, control encoder), then the checkpoint's tensors are loaded (`torch.load(weights_only=True)`) after its
identity has been checked. Cheap checks (files, identity, backbone reachability) run before any weights load.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from src.errors import ConfigError, MissingInputError, OutputError
from src.fileio import remove_orphans
from src.locks import FolderLock, is_global_rank_zero
from src.models.backbone import check_backbone
from src.models.checkpoint import CHECKPOINT_META, check_identity, checkpoint_identity, read_checkpoint
from src.models.module import OFTControlModule

log = logging.getLogger(__name__)

RUN_CONFIG = "config.yaml"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
#: run subfolders whose files are written atomically (`src.fileio.atomic_path`): a kill may leave `.*.tmp`
ATOMIC_FOLDERS = ("checkpoints", "weights")


@dataclass(frozen=True)
class RunFiles:
    """Where a run's config and the chosen checkpoint are."""

    run_dir: Path
    config: Path
    checkpoint: Path


@dataclass
class TrainedRun:
    """A rebuilt module (eval mode, no gradients) with the config it was trained with."""

    module: OFTControlModule
    config: DictConfig
    files: RunFiles

    @property
    def condition(self) -> str:
        """The task's condition (`canny`, `seg`, `landmarks`)."""
        return str(self.config.task.condition)

    @property
    def resolution(self) -> int:
        return int(self.config.model.resolution)


def locate_run(source: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> RunFiles:
    """Resolve `source` (a run directory or a checkpoint file inside `<run>/checkpoints/`) to its files."""
    path = Path(source).expanduser()
    if path.is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        ckpt = Path(checkpoint).expanduser() if checkpoint else path
    elif path.is_dir():
        run_dir, ckpt = path, Path(checkpoint).expanduser() if checkpoint else path / LAST_CHECKPOINT
    else:
        raise MissingInputError(
            f"run '{source}' is neither a run directory nor a checkpoint file: pass the folder a training run "
            "wrote (it holds config.yaml and checkpoints/last.ckpt), e.g. run=outputs/canny/runs/<date>"
        )
    if not (run_dir / RUN_CONFIG).is_file():
        raise MissingInputError(
            f"no {RUN_CONFIG} in run directory '{run_dir}': pass the folder `python -m src.train` wrote "
            "(a checkpoint must sit in <run>/checkpoints/ so its config can be found)"
        )
    if not ckpt.is_file():
        found = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
        raise MissingInputError(
            f"checkpoint '{ckpt}' does not exist; checkpoints of this run: {found or 'none'}"
        )
    return RunFiles(run_dir, run_dir / RUN_CONFIG, ckpt)


def remove_run_orphans(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a run killed while saving left in `checkpoints/` and `weights/`."""
    removed = [path for sub in ATOMIC_FOLDERS for path in remove_orphans(Path(run_dir) / sub)]
    for path in removed:
        log.warning("removed %s, left behind by a run killed while saving", path)
    return removed


@contextmanager
def own_run_directory(run_dir: str | os.PathLike, resumed: str | os.PathLike | None = None) -> Iterator[Path]:
    """Hold `run_dir` exclusively for a training run (`src.locks.FolderLock`; rank zero only).

    Another training already writing there is refused with its pid; once the lock is held, the orphan
    temporaries of a killed run are removed from `run_dir`, and from the run `resumed` (a checkpoint path)
    comes from when no live process holds that one.
    """
    run_dir = Path(run_dir)
    if not is_global_rank_zero():
        yield run_dir
        return
    with FolderLock(run_dir, "training: python -m src.train"):
        remove_run_orphans(run_dir)
        source = Path(resumed).expanduser().parent if resumed else None
        if (
            source is not None
            and source.name == "checkpoints"
            and source.parent.resolve() != run_dir.resolve()
        ):
            try:
                with FolderLock(source.parent, "removing orphan temporaries"):
                    remove_run_orphans(source.parent)
            except OutputError:
                pass  # that run is alive (its temporaries are writes in progress) or read-only
        yield run_dir


def write_run_config(cfg: DictConfig, run_dir: str | os.PathLike) -> Path:
    """Save the resolved config (without Hydra's own node) as `<run_dir>/config.yaml`; returns its path."""
    path = Path(run_dir) / RUN_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"]), path, resolve=True)
    return path


def validation_shards(source: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> list[str]:
    """The validation shards a run was trained with (built first if the run used the offline demo data)."""
    from hydra.utils import instantiate

    from src.data.pipeline import resolve_shards

    try:
        data = OmegaConf.load(locate_run(source, checkpoint).config).data
    except FileNotFoundError:  # an exported folder has no run config
        raise ConfigError(
            f"'{source}' has no training config to take validation shards from: set shards=..."
        ) from None
    if not data.get("val_shards"):
        raise ConfigError(f"the run of '{source}' had no data.val_shards: set shards=DIR/val-*.tar")
    if data.get("prepare"):
        instantiate(data.prepare)()  # the offline demo data, built once
    return resolve_shards(data.val_shards, "data.val_shards", data.get("root"))


def load_run_config(files: RunFiles, backbone_path: str | None = None) -> DictConfig:
    """The run's resolved config; `backbone_path` points the frozen backbone elsewhere (moved weights)."""
    cfg = OmegaConf.load(files.config)
    if backbone_path is not None:
        with open_dict(cfg):
            cfg.model.path = cfg.module.backbone.path = str(backbone_path)
    return cfg


def load_run(
    source: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    backbone_path: str | None = None,
) -> TrainedRun:
    """Rebuild the module of a run with its trained tensors, in eval mode with gradients off."""
    from hydra.utils import instantiate

    files = locate_run(source, checkpoint)
    cfg = load_run_config(files, backbone_path)
    state = read_checkpoint(files.checkpoint)
    backbone = instantiate(cfg.model)
    condition = str(cfg.task.condition)
    method = instantiate(cfg.module.method) if cfg.module.get("method") else None  # none: oft_control
    expected = checkpoint_identity(backbone, instantiate(cfg.oft, _convert_="all"), condition, method)
    check_identity(state[CHECKPOINT_META], expected, files.checkpoint, "the run's config.yaml")
    check_backbone(backbone)
    module: OFTControlModule = instantiate(cfg.module, condition=condition)
    module.on_load_checkpoint(state)  # identity (backbone, OFT layout) and the exact set of trained tensors
    module.load_state_dict(state["state_dict"], strict=False)
    module.eval().requires_grad_(False)
    return TrainedRun(module, cfg, files)

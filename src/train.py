"""Train OFT-Control: `python -m src.train task=canny` (Hydra; see conf/train.yaml).

`main` composes the config and calls `train(cfg)`, a plain function that returns the final metrics and
is testable without a command line.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import hydra
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_info

from src.callbacks.controllability import controllability_summary
from src.errors import ConfigError, take_debug_flag, user_errors
from src.models.backbone import check_backbone, check_resolution, unet_skeleton
from src.models.checkpoint import check_checkpoint
from src.models.module import check_schedule_length
from src.models.run import own_run_directory, write_run_config

log = logging.getLogger(__name__)


def _instantiate_all(group: DictConfig | None) -> list:
    """Instantiate every `_target_` entry of a config group such as `callbacks` or `logger`."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def preflight(cfg: DictConfig) -> pl.LightningDataModule:
    """Fail fast, before any weights load, on what users commonly get wrong; return the ready datamodule.

    Checks, in order of cost: the lr schedule's length, backbone weights reachable, the resolution
    against the VAE's factor, the method against the backbone's real UNet layout (built on the meta
    device; OFT targets and block sizes, LoRA targets), the consistency reward against the task, a resumed
    checkpoint's backbone, method, OFT layout and task, and that the shard specs match shards.
    """
    check_schedule_length(cfg.get("lr_scheduler"))
    backbone = instantiate(cfg.model)
    check_backbone(backbone)
    check_resolution(backbone)
    oft = instantiate(cfg.oft, _convert_="all")
    method = instantiate(cfg.method)
    method.check_condition(str(cfg.task.condition))
    if cfg.module.get("consistency") is not None:
        instantiate(cfg.module.consistency).check(str(cfg.task.condition))
    method.check(unet_skeleton(backbone), oft)
    if cfg.get("ckpt_path"):
        check_checkpoint(cfg.ckpt_path, backbone, oft, cfg.task.condition, method)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


@dataclass
class Run:
    """Everything `train` composes from a config, before fitting."""

    trainer: pl.Trainer
    module: pl.LightningModule
    datamodule: pl.LightningDataModule


def build_run(cfg: DictConfig) -> Run:
    """Check the config cheaply, then instantiate data, module, callbacks, loggers and trainer."""
    datamodule = preflight(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    module = instantiate(cfg.module, condition=cfg.task.condition)
    log.info(
        "method %s, trainable: %s (adapted %d UNet layers)",
        module.method.name,
        module.parameter_summary(),
        len(module.adapted_layers),
    )
    callbacks = _instantiate_all(cfg.get("callbacks"))
    loggers = _instantiate_all(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return Run(trainer, module, datamodule)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the module described by `cfg` and return the final logged metrics as floats.

    The run directory is held exclusively for the whole run (another training there is refused), and
    temporaries left by a killed run are removed first (`src.models.run.own_run_directory`).
    """
    set_threads(cfg.get("threads"))
    with own_run_directory(cfg.paths.output_dir, cfg.get("ckpt_path")):
        run = build_run(cfg)
        write_run_config(cfg, cfg.paths.output_dir)
        ckpt = cfg.get("ckpt_path")
        run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=ckpt, weights_only=True)
    metrics = {name: float(value) for name, value in run.trainer.callback_metrics.items()}
    for line in controllability_summary(metrics):
        rank_zero_info(f"at step {run.trainer.global_step}: {line}")
    return metrics


def set_threads(threads: int | str | None) -> None:
    """torch's intra-op threads for this process (`threads` in conf/train.yaml): a number, `auto` (the cores
    the 1-minute load average leaves free, at least 1), or null (torch's default)."""
    if threads == "auto":
        threads = max(1, (os.cpu_count() or 1) - round(os.getloadavg()[0]))
    if threads is None:
        return
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ConfigError(f"threads={threads!r}: give a positive number of torch threads, auto or null")
    torch.set_num_threads(threads)
    log.info("torch threads: %d", threads)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the optimized metric for sweepers. Errors users cause print one line."""
    with user_errors():
        metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    take_debug_flag()
    main()

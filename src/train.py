"""Train OFT-Control: `python -m src.train task=canny` (Hydra; see conf/train.yaml).

`main` composes the config and calls `train(cfg)`, a plain function that returns the final metrics and
is testable without a command line.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.models.backbone import check_backbone

log = logging.getLogger(__name__)


def _instantiate_all(group: DictConfig | None) -> list:
    """Instantiate every `_target_` entry of a config group such as `callbacks` or `logger`."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def preflight(cfg: DictConfig) -> None:
    """Fail fast, before any weights load, on what users commonly get wrong."""
    check_backbone(instantiate(cfg.model))


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the module described by `cfg` and return the final logged metrics as floats."""
    preflight(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module)
    log.info("trainable: %s (adapted %d UNet layers)", module.parameter_summary(), len(module.adapted_layers))
    trainer = instantiate(cfg.trainer, callbacks=_instantiate_all(cfg.get("callbacks")),
                          logger=_instantiate_all(cfg.get("logger")) or False)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    return {name: float(value) for name, value in trainer.callback_metrics.items()}


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the optimized metric for sweepers."""
    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()

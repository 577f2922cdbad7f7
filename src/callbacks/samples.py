"""Sample grids (condition | generated | target) written as PNG and logged to TensorBoard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
from torchvision.utils import save_image

from src.grids import condition_columns, image_grid


class SampleGrid(pl.Callback):
    """At each validation, generate from the first validation batch and save the grid.

    Grids go to `<run dir>/<dirname>/step_XXXXXX.png` and to every TensorBoard logger as `samples`.
    Skipped during Lightning's sanity check.
    """

    def __init__(self, max_images: int = 4, dirname: str = "samples") -> None:
        self.max_images = max_images
        self.dirname = dirname

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        n = min(self.max_images, len(batch["caption"]))
        generated = pl_module.validation_samples(batch, n)
        target = (batch["image"][:n].float() + 1) / 2
        grid = image_grid(*condition_columns(batch["condition"][:n].float()), generated, target)
        path = Path(trainer.default_root_dir) / self.dirname / f"step_{trainer.global_step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", grid, trainer.global_step)

"""What a user sees while training: a progress bar for step-bounded runs, one note about frozen modules."""

from __future__ import annotations

import logging
import warnings

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.utilities.warnings import PossibleUserWarning

log = logging.getLogger(__name__)

#: Lightning's generic warning, true of every OFT-Control run: the frozen backbone stays in eval mode.
LIGHTNING_EVAL_MODE_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar; without an epoch limit (``max_epochs=-1``, streaming runs bounded by
    ``max_steps``) it reads "Epoch 14" instead of Lightning's "Epoch 14/-2"."""

    def _get_train_description(self, current_epoch: int) -> str:
        description = super()._get_train_description(current_epoch)
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs < 0:
            description = description.replace(f"/{max_epochs - 1}", "", 1)
        return description


class FrozenModulesInEvalMode(pl.Callback):
    """Says once, in our words, that the frozen backbone trains in eval mode on purpose.

    The VAE, text encoder and UNet are frozen and kept in eval mode (no dropout); only the method's parts
    train (the control encoder and the rotations by default). Lightning warns about "N module(s) in eval mode" at every fit; that warning is
    silenced, and replaced by one info line, plus a warning naming any module that holds
    trainable parameters and is still in eval mode (which would be a real mistake).
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Narrow and process-wide (filterwarnings does not add an identical filter twice): only this
        # message of this category is hidden.
        warnings.filterwarnings("ignore", message=LIGHTNING_EVAL_MODE_WARNING, category=PossibleUserWarning)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        frozen = [name for name, module in pl_module.named_modules() if not module.training]
        trained_in_eval = [
            name
            for name, module in pl_module.named_modules()
            if not module.training and any(p.requires_grad for p in module.parameters(recurse=False))
        ]
        if trained_in_eval:
            warnings.warn(
                f"{len(trained_in_eval)} module(s) with trainable parameters are in eval mode at the start of "
                f"training (dropout/normalisation behave as at inference): {trained_in_eval[:5]}",
                stacklevel=1,
            )
        tops = sorted({name.split(".", 1)[0] for name in frozen if name})
        method = getattr(getattr(pl_module, "method", None), "name", None) or "the module's"
        log.info(
            "%d frozen backbone modules (%s) stay in eval mode on purpose; only what method %s trains "
            "(its parameter groups) is trained",
            len(frozen),
            ", ".join(tops),
            method,
        )

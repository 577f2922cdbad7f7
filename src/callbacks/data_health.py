"""Data health during training: sum the skip counts every batch carries, log them, stop a broken run.

Every batch from ``ShardDataModule`` carries ``batch["data_counts"]`` (``src.data.health``): the
samples decoded and the samples skipped or noted by reason, in the worker that made the batch, since
its previous batch. This callback sums them over the run (training) and per validation pass, logs

- ``data/skipped/<reason>``, ``data/noted/<reason>``, ``data/decoded`` (this rank's running totals),
- ``data/skip_fraction`` = skipped / (decoded + skipped), summed over all ranks,

(``data/val/...`` for validation) and raises :class:`~src.data.health.DataHealthError` when the skip
fraction exceeds ``max_skip_fraction`` once at least ``min_samples`` samples were seen, or when a
training epoch yields no batch at all (every shard unreadable, or fewer samples than a batch).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch

from src.data.health import COUNTS_KEY, DataHealthError, skip_fraction, top_reasons
from src.errors import ConfigError

CONFIG_KEY = "callbacks.data_health.max_skip_fraction"


class DataHealth(pl.Callback):
    """Counts, logs and limits skipped samples (see the module docstring).

    Args:
        max_skip_fraction: largest tolerated share of skipped samples, in [0, 1].
        min_samples: samples (decoded + skipped, over all ranks) before the limit applies, so a few bad
            samples at the start of a run do not stop it.
    """

    def __init__(self, max_skip_fraction: float = 0.05, min_samples: int = 200) -> None:
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ConfigError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        if min_samples < 0:
            raise ConfigError(f"min_samples must be >= 0, got {min_samples}")
        self.max_skip_fraction, self.min_samples = max_skip_fraction, min_samples
        self.train: Counter[str] = Counter()
        self.val: Counter[str] = Counter()
        self._epoch_batches = 0

    # ------------------------------------------------------------------------------------- checks
    def _global(
        self, trainer: pl.Trainer, counts: Mapping[str, int], device: torch.device
    ) -> tuple[float, int, int]:
        """``(fraction, skipped, seen)`` summed over ranks (one all-reduce of two numbers)."""
        _, skipped, seen = skip_fraction(counts)
        if trainer.world_size > 1:
            total = trainer.strategy.reduce(
                torch.tensor([skipped, seen], dtype=torch.float64, device=device), reduce_op="sum"
            )
            skipped, seen = int(total[0].item()), int(total[1].item())
        return (skipped / seen if seen else 0.0), skipped, seen

    def check(self, fraction: float, skipped: int, seen: int, counts: Mapping[str, int], what: str) -> None:
        """Raise DataHealthError if ``fraction`` is over the limit after ``min_samples``."""
        if seen < self.min_samples or fraction <= self.max_skip_fraction:
            return
        raise DataHealthError(
            f"{what}: {fraction:.1%} of samples were skipped ({skipped} of {seen} read), over the limit "
            f"{self.max_skip_fraction:.1%}; top reasons on this rank: {top_reasons(counts)}. Fix or rebuild "
            f"the shards (see the warnings logged per reason), or raise {CONFIG_KEY}."
        )

    @staticmethod
    def _log(
        pl_module: pl.LightningModule, prefix: str, counts: Mapping[str, int], fraction: float, on_step: bool
    ) -> None:
        """Log the totals under ``prefix/`` (per step in training, per pass in validation)."""
        metrics = {f"{prefix}/{key}": float(value) for key, value in counts.items()}
        metrics[f"{prefix}/skip_fraction"] = fraction
        pl_module.log_dict(metrics, on_step=on_step, on_epoch=not on_step, batch_size=1)

    # ------------------------------------------------------------------------------------ training
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_batches = 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Add the batch's counts, log the running totals and check the limit."""
        self._epoch_batches += 1
        self.train.update(batch.get(COUNTS_KEY, {}) if isinstance(batch, Mapping) else {})
        fraction, skipped, seen = self._global(trainer, self.train, pl_module.device)
        self._log(pl_module, "data", self.train, fraction, on_step=True)
        self.check(fraction, skipped, seen, self.train, "training data")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """An epoch without a single batch would repeat forever: stop with the reasons known so far."""
        if self._epoch_batches == 0:
            raise DataHealthError(
                f"training epoch {trainer.current_epoch} yielded no batch: every shard unreadable or fewer "
                f"samples than a batch (skips so far on this rank: {top_reasons(self.train)}; skips after "
                "a worker's last batch are not reported, see the warnings logged per reason)."
            )

    # ---------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.val = Counter()

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.val.update(batch.get(COUNTS_KEY, {}) if isinstance(batch, Mapping) else {})

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log this validation pass's counts and check the limit on them."""
        if trainer.sanity_checking:
            return
        fraction, skipped, seen = self._global(trainer, self.val, pl_module.device)
        self._log(pl_module, "data/val", self.val, fraction, on_step=False)
        self.check(fraction, skipped, seen, self.val, "validation data")

    # ------------------------------------------------------------------------------------ resuming
    def state_dict(self) -> dict[str, Any]:
        """The training totals, so a resumed run keeps counting where it stopped."""
        return {"train": dict(self.train)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train = Counter(state_dict.get("train", {}))

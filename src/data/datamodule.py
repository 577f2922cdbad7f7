"""Lightning datamodule over schema shards (docs/design.md, "Shard schema", streaming).

Batches as the model and callbacks see them (after the transfer to the device) are dicts::

    {"image": float32 [B, 3, H, W] in [-1, 1],     # target, H = W = resolution
     "condition": float32 [B, 3, H, W] in [0, 1],  # canny replicated to 3 channels; seg/landmarks RGB
     "caption": list[str], "key": list[str],
     "data_counts": dict[str, int]}              # events since this worker's previous batch

A multi condition (``condition="canny+seg"``, ``src.data.schema.condition_names``) stacks one 3-channel
block per name, in the order of the names: ``condition`` is float32 ``[B, 3k, H, W]`` (uint8 ``[B, 3k, H,
W]`` from the loaders), and the batch carries ``"present"``: bool ``[B, k]``, True where the sample had
that condition's member (a missing one is zeros; a sample with none is skipped as ``missing_condition``).
Single-condition batches have no ``present``.

The loaders themselves yield the compact form: ``image`` uint8 ``[B, 3, H, W]`` and ``condition``
uint8 ``[B, C, H, W]`` (C = 1 for canny, 3 for seg/landmarks), stored channels-last, the other fields
as above. :meth:`ShardDataModule.on_after_batch_transfer` converts them on the device with
``pipeline.to_model_inputs``, so DataLoader workers, shared memory and the host-to-device copy move
uint8; code that iterates the loaders without a Trainer calls ``to_model_inputs`` itself.

``data_counts`` (``decoded``, ``skipped/<reason>``, ``noted/<reason>``; see ``src.data.health``) is
how skip counts reach the main process with ``num_workers > 0``; ``src.callbacks.data_health``
sums, logs and limits them.

Data position on resume (streaming has no sample-exact position):

- A checkpoint stores the epoch and global step, not a position in the stream. A resumed run starts
  its current epoch's stream from the beginning, with a seed derived from (``seed``, restored epoch,
  restored global step) (``pipeline.resume_seed``): shard order, shuffle buffer, augmentation and,
  with ``resampled=True``, the drawn shards differ from the original run's, so a resume does not
  replay the sample sequence the run started with. Samples seen before the interruption in that
  epoch may be seen again and others may be missed in that epoch; no sample is lost for good.
- A fresh run (epoch 0, step 0) uses ``seed`` itself: two fresh runs with the same seed, shards and
  ``num_workers`` read the same samples in the same order.
- Within a run, every epoch (every pass over the loader) reshuffles: in the main process through a
  pass counter, in DataLoader workers through the per-epoch worker seed that PyTorch draws.
- With ``resampled=True`` the stream is stateless: shards are drawn with replacement, an epoch is
  ``batches_per_epoch()`` batches, and a resume simply draws from a new seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import webdataset as wds

from src.data import schema
from src.data.pipeline import (
    SampleDecoder,
    SkipCounter,
    eval_pipeline,
    resolve_shards,
    resume_seed,
    to_model_inputs,
    train_pipeline,
)
from src.errors import ConfigError


class ShardDataModule(pl.LightningDataModule):
    """Streams webdataset shards for one task condition (or several, ``"canny+seg"``).

    Args:
        train_shards: shard spec (brace pattern, glob, directory, ``pipe:`` URL, or a list of these).
        val_shards: same for validation, or None for no validation loader.
        condition: ``"canny"``, ``"seg"`` or ``"landmarks"`` (see ``src.data.schema.CONDITIONS``), or
            several joined by ``+`` (``"canny+seg"``: a multi condition, see above).
        resolution: side of the square crops.
        batch_size / val_batch_size: per-rank batch sizes.
        num_workers: DataLoader worker processes (0 reads in the main process).
        shuffle_buffer: samples in the training shuffle buffer.
        resampled: draw training shards with replacement forever (multi-node); needs ``epoch_samples``.
        epoch_samples: samples per epoch over all ranks; with it every rank yields exactly
            ``max(1, epoch_samples // (world_size * batch_size))`` batches per epoch.
        seed: base seed of shard resampling, shuffling and augmentation.
        prepare: called once in ``prepare_data()`` (e.g. the demo builder that ``conf/data/demo.yaml`` names).
        random_flip: horizontal flip of target and condition together during training (ignored for
            ``landmarks``, whose left/right colours a mirror would swap, and for a multi condition
            that holds it).
        root: folder that relative local shard specs are resolved against (absolute specs and
            ``pipe:`` URLs are used as given); None resolves against the working directory.
        max_member_bytes / max_image_pixels / max_caption_chars: what one sample may cost
            (``src.data.schema.Limits``); a sample over a limit is skipped and counted
            (``member_too_large``, ``image_too_large``, ``caption_too_long``) before it is read or decoded.
    """

    def __init__(
        self,
        train_shards: str | Sequence[str],
        val_shards: str | Sequence[str] | None = None,
        condition: str = "canny",
        resolution: int = 512,
        batch_size: int = 4,
        val_batch_size: int = 4,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        epoch_samples: int | None = None,
        seed: int = 0,
        prepare: Callable[[], object] | None = None,
        random_flip: bool = True,
        root: str | None = None,
        max_member_bytes: int = schema.MAX_MEMBER_BYTES,
        max_image_pixels: int = schema.MAX_IMAGE_PIXELS,
        max_caption_chars: int = schema.MAX_CAPTION_CHARS,
    ) -> None:
        super().__init__()
        schema.condition_names(condition)
        self.limits = schema.Limits(max_member_bytes, max_image_pixels, max_caption_chars)
        for name, value in (
            ("resolution", resolution),
            ("batch_size", batch_size),
            ("val_batch_size", val_batch_size),
        ):
            if value < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {value}")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}")
        if resampled and not epoch_samples:
            raise ConfigError(
                "data.resampled=True streams forever: set data.epoch_samples (samples per epoch)"
            )
        self.train_shards, self.val_shards = train_shards, val_shards
        self.condition, self.resolution = condition, resolution
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers
        self.shuffle_buffer, self.resampled, self.epoch_samples = shuffle_buffer, resampled, epoch_samples
        self.seed, self.prepare, self.random_flip, self.root = seed, prepare, random_flip, root
        self.train_urls: list[str] = []
        self.val_urls: list[str] = []
        self.train_skips, self.val_skips = SkipCounter("train"), SkipCounter("val")

    def prepare_data(self) -> None:
        """Run the ``prepare`` hook (e.g. build the demo shards) once per node."""
        if self.prepare is not None:
            self.prepare()

    def setup(self, stage: str | None = None) -> None:
        """Resolve the shard specs (after ``prepare_data`` so freshly built shards are found)."""
        self.train_urls = resolve_shards(self.train_shards, "data.train_shards", self.root)
        if self.val_shards is not None:
            self.val_urls = resolve_shards(self.val_shards, "data.val_shards", self.root)

    def _world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.world_size if trainer is not None else 1

    def _loader(self, pipeline: wds.DataPipeline) -> wds.WebLoader:
        return wds.WebLoader(
            pipeline, batch_size=None, shuffle=False, num_workers=self.num_workers, persistent_workers=False
        )

    def stream_seed(self) -> int:
        """Seed of the training stream: ``seed`` for a fresh run, derived from the restored epoch/step
        on resume (the trainer restores both before it asks for the training loader)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return self.seed
        return resume_seed(self.seed, trainer.current_epoch, trainer.global_step)

    def batches_per_epoch(self) -> int | None:
        """Training batches each rank yields per epoch (None when the epoch is one pass over shards)."""
        if not self.epoch_samples:
            return None
        return max(1, self.epoch_samples // (self._world_size() * self.batch_size))

    def train_dataloader(self) -> wds.WebLoader:
        """Shuffled (optionally resampled) training batches, seeded by :meth:`stream_seed`."""
        if not self.train_urls:
            self.setup("fit")
        seed = self.stream_seed()
        decoder = SampleDecoder(self.condition, self.resolution, True, self.random_flip, seed, self.limits)
        pipeline = train_pipeline(
            self.train_urls,
            decoder,
            batch_size=self.batch_size,
            shuffle_buffer=self.shuffle_buffer,
            resampled=self.resampled,
            seed=seed,
            skips=self.train_skips,
        )
        n_batches = self.batches_per_epoch()
        if n_batches is None:
            return self._loader(pipeline)
        pipeline.with_epoch(math.ceil(n_batches / max(1, self.num_workers)))
        return self._loader(pipeline).with_epoch(n_batches)

    def val_dataloader(self) -> wds.WebLoader | list:
        """Every validation sample exactly once, in order, centre-cropped, not flipped."""
        if self.val_shards is None:
            return []
        if not self.val_urls:
            self.setup("validate")
        decoder = SampleDecoder(self.condition, self.resolution, False, False, self.seed, self.limits)
        pipeline = eval_pipeline(self.val_urls, decoder, batch_size=self.val_batch_size, skips=self.val_skips)
        return self._loader(pipeline)

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """uint8 batch on the device -> the float batch of the module docstring (``to_model_inputs``);
        the training/validation steps and the callbacks' batch hooks all receive the converted batch."""
        return to_model_inputs(batch)

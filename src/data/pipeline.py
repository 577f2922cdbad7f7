"""Streaming pipeline over schema shards: spec resolution, safe decoding, paired transforms, batching.

Only the schema's members are read from a tar (``select_files``) and only the ones a task needs are
decoded, by explicit decoders (cv2 for images, UTF-8, json). Nothing is ever unpickled. Bad samples
and shards are skipped and counted by reason, and every batch carries the counts
(``src.data.health``).
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand

from src.data import schema
from src.data.health import MemberFilter, SkipCounter
from src.data.transforms import center_offsets, crop, random_offsets, resize_shorter

log = logging.getLogger(__name__)

_GLOB_CHARS = set("*?[")


# ------------------------------------------------------------------------------- shard specs
def _expand_one(pattern: str) -> list[str]:
    """Local matches of one brace-free pattern: a glob, a directory (its ``*.tar``) or a file."""
    path = os.path.expanduser(pattern)
    if _GLOB_CHARS & set(path):
        return sorted(p for p in glob.glob(path) if os.path.isfile(p))
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "*.tar")))
    return [path] if os.path.isfile(path) else []


def resolve_shards(
    spec: str | os.PathLike | Sequence[str | os.PathLike], what: str = "shards", root: str | None = None
) -> list[str]:
    """Expand a shard spec into a list of URLs.

    Accepts brace patterns (``train-{000000..000009}.tar``), globs (``DIR/train-*.tar``), a directory
    (all ``*.tar`` in it, sorted), lists of any of these, and ``pipe:``/``scheme://`` URLs, which pass
    through untouched. Relative local specs are taken relative to ``root`` when given. A local pattern
    that matches nothing raises a ValueError naming ``what``.
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        return [url for item in spec for url in resolve_shards(item, what, root)]
    if spec.startswith("pipe:") or "://" in spec:
        return [spec]
    if root is not None:
        spec = os.path.join(os.path.expanduser(root), os.path.expanduser(spec))
    urls, missing = [], []
    for pattern in braceexpand(spec):
        matches = _expand_one(pattern)
        urls += matches
        if not matches:
            missing.append(pattern)
    if missing:
        raise ValueError(
            f"{what}={spec!r}: no shard found for {missing[:3]}{' ...' if len(missing) > 3 else ''}. "
            f"Build shards with `python -m data_prep.coco --images ... --captions ... --out DIR` "
            f"(or `python -m data_prep.demo --root DIR`) and set {what} to DIR/train-*.tar (or a list).")
    return urls


# ------------------------------------------------------------------------------ randomness
def process_seed(seed: int, counter: int) -> list[int]:
    """Seed material that differs per rank, per worker and per epoch, and is reproducible.

    Inside a DataLoader worker ``torch.initial_seed()`` changes every epoch (drawn from the main
    process's seeded generator); ``counter`` counts passes in a process that persists.
    """
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    return [seed, rank, worker, torch.initial_seed() % 2**32, counter]


def resume_seed(seed: int, epoch: int, step: int) -> int:
    """Seed of a training stream that starts at (``epoch``, ``step``): ``seed`` itself for a fresh run.

    A resumed run (restored epoch/step) derives a different seed, so it reshuffles shards and samples
    instead of replaying the sample order of the run's start (see ``ShardDataModule``).
    """
    if epoch == 0 and step == 0:
        return seed
    digest = hashlib.sha1(f"{seed}:{epoch}:{step}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _resample_seed() -> int:
    """Worker seed for ``wds.ResampledShards``: distinct per rank/worker and per epoch."""
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    return (rank * 1000 + worker) * 2**32 + torch.initial_seed() % 2**32


class BufferShuffle:
    """Shuffle buffer stage (like ``wds.shuffle``) seeded by :func:`process_seed` on every pass."""

    def __init__(self, bufsize: int, seed: int) -> None:
        self.bufsize, self.seed, self.passes = bufsize, seed, 0

    def __call__(self, src: Iterable[Any]) -> Iterator[Any]:
        rng = random.Random(str(process_seed(self.seed, self.passes)))
        self.passes += 1
        buffer: list[Any] = []
        for item in src:
            buffer.append(item)
            if len(buffer) >= self.bufsize:
                index = rng.randrange(len(buffer))
                buffer[index], buffer[-1] = buffer[-1], buffer[index]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer


class EvalSplit:
    """Split for evaluation so that every sample is seen exactly once over all ranks and workers.

    With at least as many shards as (ranks x workers) shards are split; otherwise every slot reads all
    shards and keeps every n-th sample (no rank or worker is left empty).
    """

    def __init__(self, n_shards: int) -> None:
        self.n_shards = n_shards

    @staticmethod
    def _slot() -> tuple[int, int]:
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        return rank * workers + worker, world * workers

    def shards(self, src: Iterable[Any]) -> Iterator[Any]:
        slot, slots = self._slot()
        yield from (src if self.n_shards < slots else list(src)[slot::slots])

    def samples(self, src: Iterable[Any]) -> Iterator[Any]:
        slot, slots = self._slot()
        yield from (src if self.n_shards >= slots else (s for i, s in enumerate(src) if i % slots == slot))


# ---------------------------------------------------------------------------------- decoding
class SampleDecoder:
    """Raw sample (member bytes) -> ``{"image", "condition", "caption", "key"}`` tensors.

    Decodes the jpg, the caption and the task's condition member, applies the same resize (shorter
    side to ``resolution``), crop (random if ``train`` else centred) and optional horizontal flip (only
    for conditions whose spec is ``flippable``) to target and condition (the condition with its spec's
    interpolation), and scales the image to
    [-1, 1] and the condition to [0, 1], both float32 [3, H, W].
    """

    def __init__(self, condition: str, resolution: int, train: bool, random_flip: bool, seed: int) -> None:
        self.spec = schema.condition_spec(condition)
        self.resolution, self.train, self.random_flip, self.seed = resolution, train, random_flip, seed
        self._rng: np.random.Generator | None = None
        self._pid = -1

    def _generator(self) -> np.random.Generator:
        if self._rng is None or self._pid != os.getpid():
            self._rng, self._pid = np.random.default_rng(process_seed(self.seed, 0)), os.getpid()
        return self._rng

    def _members(self, sample: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, str]:
        for member in (schema.IMAGE, schema.CAPTION, self.spec.member):
            if member not in sample:
                raise schema.SampleError(f"missing_{member}", f"sample {sample.get('__key__')}")
        image = schema.decode_member(schema.IMAGE, sample[schema.IMAGE])
        cond = schema.decode_member(self.spec.member, sample[self.spec.member])
        if image.shape[:2] != cond.shape[:2]:
            raise schema.SampleError("size_mismatch", f"{sample['__key__']}: {image.shape} vs {cond.shape}")
        return image, cond, schema.decode_member(schema.CAPTION, sample[schema.CAPTION])

    def transform(self, image: np.ndarray, cond: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Paired resize + crop + flip (identical geometry for both arrays)."""
        size = self.resolution
        image, cond = resize_shorter(image, size), resize_shorter(cond, size, self.spec.interpolation)
        height, width = image.shape[:2]
        rng = self._generator() if self.train else None
        top, left = random_offsets(height, width, size, rng) if rng else center_offsets(height, width, size)
        image, cond = crop(image, top, left, size), crop(cond, top, left, size)
        if rng is not None and self.random_flip and self.spec.flippable and rng.random() < 0.5:
            image, cond = image[:, ::-1], cond[:, ::-1]
        return image, cond

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image, cond, caption = self._members(sample)
        image, cond = self.transform(image, cond)
        if cond.ndim == 2:
            cond = np.repeat(cond[:, :, None], 3, axis=2)
        image_t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1.0
        cond_t = torch.from_numpy(np.ascontiguousarray(cond[:, :, :3])).permute(2, 0, 1).float() / 255.0
        return {"image": image_t, "condition": cond_t, "caption": caption, "key": sample["__key__"]}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack decoded samples into a batch dict (tensors stacked, strings as lists).

    Only the four sample fields are batched; the pipeline's last stage (``SkipCounter.attach``) then
    adds ``batch["data_counts"]``, which the module ignores and ``DataHealth`` reads.
    """
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "condition": torch.stack([s["condition"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
    }


# ---------------------------------------------------------------------------------- pipelines
def train_pipeline(urls: list[str], decoder: SampleDecoder, *, batch_size: int, shuffle_buffer: int,
                   resampled: bool, seed: int, skips: SkipCounter) -> wds.DataPipeline:
    """Training stream: resampled shards (or node- then worker-split shards), shuffle, decode, batch."""
    if resampled:
        source = [wds.ResampledShards(urls, seed=seed, worker_seed=_resample_seed, deterministic=True)]
    else:
        source = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker,
                  BufferShuffle(len(urls), seed)]
    return wds.DataPipeline(
        *source,
        wds.tarfile_to_samples(handler=skips, select_files=MemberFilter(skips)),
        BufferShuffle(max(1, shuffle_buffer), seed),
        wds.map(decoder, handler=skips),
        skips.tally,
        wds.batched(batch_size, collation_fn=collate, partial=False),
        skips.attach,
    )


def eval_pipeline(urls: list[str], decoder: SampleDecoder, *, batch_size: int,
                  skips: SkipCounter) -> wds.DataPipeline:
    """Evaluation stream: every sample exactly once over all ranks and workers, in order, no shuffle."""
    split = EvalSplit(len(urls))
    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        split.shards,
        wds.tarfile_to_samples(handler=skips, select_files=MemberFilter(skips)),
        split.samples,
        wds.map(decoder, handler=skips),
        skips.tally,
        wds.batched(batch_size, collation_fn=collate, partial=True),
        skips.attach,
    )

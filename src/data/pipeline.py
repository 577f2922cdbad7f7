"""Streaming pipeline over schema shards: spec resolution, safe decoding, paired transforms, batching.

Only the schema's members are read from a tar (``src.data.reader.ShardReader``, which also checks keys,
member types and sizes from the tar headers) and only the ones a task needs are decoded, by explicit
decoders (cv2 for images, UTF-8, json) behind the size limits of ``src.data.schema.Limits``. Nothing is
ever unpickled. Bad samples and shards are skipped and counted by reason, and every batch carries the
counts (``src.data.health``).

Samples and batches stay uint8 up to the device (a sixth of the float32 bytes through DataLoader
workers' shared memory and the host-to-device copy); :func:`to_model_inputs` turns them into the
model's float inputs there (``ShardDataModule.on_after_batch_transfer``; other readers call it).
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cache
from typing import Any

import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand

from src.data import schema
from src.data.health import SkipCounter
from src.data.reader import ShardReader
from src.data.transforms import center_offsets, crop, hflip, random_offsets, resize_shorter
from src.errors import InputError

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
        raise InputError(
            f"{what}={spec!r}: no shard found for {missing[:3]}{' ...' if len(missing) > 3 else ''}. "
            f"Build shards with a converter (README, 'Prepare your data': COCO, ADE20K, faces or the demo) "
            f"into DIR and set {what} to DIR/train-*.tar (or a list)."
        )
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
    """Raw sample (member bytes) -> ``{"image", "condition", "caption", "key"}``, pixels as uint8.

    Decodes the jpg, the caption and the task's condition member, applies the same resize (shorter
    side to ``resolution``), crop (random if ``train`` else centred) and optional horizontal flip (only
    for conditions whose spec is ``flippable``) to target and condition (the condition with its spec's
    interpolation). ``image`` is uint8 ``[3, H, W]``, ``condition`` uint8 ``[C, H, W]`` with the
    member's channels (1 for canny, 3 for seg/landmarks); both are views of the decoded HWC arrays
    (no copy). :func:`to_model_inputs` makes the model's float inputs of them. ``limits`` bound the
    pixels of every image and the length of the caption (and, in the reader, the bytes of every member).

    A **multi condition** (``"canny+seg"``, :func:`src.data.schema.condition_names`) decodes every
    member present, each resized with its own spec's interpolation, cropped with the image's crop and
    made 3 channels (a 1-channel map repeated), and stacks them along channels in the order of the
    names: ``condition`` is uint8 ``[3k, H, W]`` and the sample gains ``present``, a bool ``[k]`` that is
    True where the member was in the sample. A missing member is zeros; a sample with none of them is
    skipped (``missing_condition``); a size mismatch of any member is ``size_mismatch``; the flip is
    drawn only when every condition is ``flippable``. A single condition never carries ``present``.
    """

    def __init__(
        self,
        condition: str,
        resolution: int,
        train: bool,
        random_flip: bool,
        seed: int,
        limits: schema.Limits = schema.LIMITS,
    ) -> None:
        self.names = schema.condition_names(condition)
        self.specs = [schema.condition_spec(name) for name in self.names]
        self.multi = len(self.specs) > 1
        self.spec = self.specs[0]
        self.flippable = all(spec.flippable for spec in self.specs)
        self.resolution, self.train, self.random_flip, self.seed = resolution, train, random_flip, seed
        self.limits = limits
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
        caption = schema.decode_member(schema.CAPTION, sample[schema.CAPTION], self.limits)
        image = schema.decode_member(schema.IMAGE, sample[schema.IMAGE], self.limits)
        cond = schema.decode_member(self.spec.member, sample[self.spec.member], self.limits)
        if image.shape[:2] != cond.shape[:2]:
            raise schema.SampleError("size_mismatch", f"{sample['__key__']}: {image.shape} vs {cond.shape}")
        return image, cond, caption

    def _multi_members(self, sample: dict[str, Any]) -> tuple[np.ndarray, list[np.ndarray | None], str]:
        """Image, the decoded condition of every name (None where its member is missing) and the caption."""
        for member in (schema.IMAGE, schema.CAPTION):
            if member not in sample:
                raise schema.SampleError(f"missing_{member}", f"sample {sample.get('__key__')}")
        if not any(spec.member in sample for spec in self.specs):
            members = [spec.member for spec in self.specs]
            raise schema.SampleError(
                "missing_condition", f"sample {sample.get('__key__')} has none of {members}"
            )
        caption = schema.decode_member(schema.CAPTION, sample[schema.CAPTION], self.limits)
        image = schema.decode_member(schema.IMAGE, sample[schema.IMAGE], self.limits)
        conds: list[np.ndarray | None] = []
        for spec in self.specs:
            if spec.member not in sample:
                conds.append(None)
                continue
            cond = schema.decode_member(spec.member, sample[spec.member], self.limits)
            if image.shape[:2] != cond.shape[:2]:
                raise schema.SampleError(
                    "size_mismatch", f"{sample['__key__']}: {image.shape} vs {spec.member} {cond.shape}"
                )
            conds.append(cond)
        return image, conds, caption

    def _offsets(self, height: int, width: int) -> tuple[int, int, bool]:
        """(top, left) of the crop and whether to mirror: the random draws of one sample, in their order."""
        size = self.resolution
        rng = self._generator() if self.train else None
        top, left = random_offsets(height, width, size, rng) if rng else center_offsets(height, width, size)
        mirror = rng is not None and self.random_flip and self.flippable and rng.random() < 0.5
        return top, left, mirror

    def crops(self, sample: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, str, bool]:
        """Decoded, resized and cropped ``image`` and ``condition`` (HWC views when no resize is needed,
        the condition with its channel axis), the caption, and whether the pair is to be mirrored: all
        but the one copy that :class:`DecodeBatches` makes into a batch (``__call__`` into a sample).
        A multi condition's ``condition`` is its ``[H, W, 3k]`` stack (see :meth:`crops_present`)."""
        return self.crops_present(sample)[:4]

    def crops_present(
        self, sample: dict[str, Any]
    ) -> tuple[np.ndarray, np.ndarray, str, bool, np.ndarray | None]:
        """:meth:`crops` plus, for a multi condition, the bool ``[k]`` of the members present (else None)."""
        if self.multi:
            return self._multi_crops(sample)
        image, cond, caption = self._members(sample)
        size = self.resolution
        image, cond = resize_shorter(image, size), resize_shorter(cond, size, self.spec.interpolation)
        top, left, mirror = self._offsets(*image.shape[:2])
        image, cond = crop(image, top, left, size), crop(cond, top, left, size)
        return image, cond if cond.ndim == 3 else cond[..., None], caption, mirror, None

    def _multi_crops(self, sample: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, str, bool, np.ndarray]:
        image, conds, caption = self._multi_members(sample)
        size = self.resolution
        image = resize_shorter(image, size)
        top, left, mirror = self._offsets(*image.shape[:2])
        image = crop(image, top, left, size)
        stack = np.zeros((*image.shape[:2], 3 * len(conds)), np.uint8)
        for index, (cond, spec) in enumerate(zip(conds, self.specs, strict=True)):
            if cond is not None:
                cond = crop(resize_shorter(cond, size, spec.interpolation), top, left, size)
                stack[..., 3 * index : 3 * index + 3] = cond if cond.ndim == 3 else cond[..., None]
        present = np.array([cond is not None for cond in conds], dtype=bool)
        return image, stack, caption, mirror, present

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image, cond, caption, mirror, present = self.crops_present(sample)
        if mirror:
            image, cond = hflip(image), hflip(cond)
        decoded = {
            "image": _chw(image),
            "condition": _chw(cond),
            "caption": caption,
            "key": sample["__key__"],
        }
        if present is not None:
            decoded["present"] = torch.from_numpy(present)
        return decoded


class DecodeBatches:
    """Pipeline stage: raw samples -> uint8 batches, the same as ``collate([decoder(s) for s in ...])``
    bit for bit, with every sample's pixels copied once, straight into its slot of the batch (the
    mirror, when drawn, is done by that copy), instead of a flip copy and then a stacking copy.

    A multi-condition decoder's batches also carry ``present``, bool ``[B, k]`` (see :class:`SampleDecoder`).

    Samples that fail to decode are counted by ``skips`` (its handler policy, as ``wds.map``); with
    ``partial`` an incomplete last batch is handed on, otherwise dropped. Like ``wds.batched``, a full
    batch is handed on once the next sample has decoded (and been copied into the next batch) or the
    stream has ended, so the skips before that sample, and those at the end of a pass, travel with it.
    """

    def __init__(self, decoder: SampleDecoder, batch_size: int, partial: bool, skips: SkipCounter) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be at least 1")
        self.decoder, self.batch_size, self.partial, self.skips = decoder, batch_size, partial, skips

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        image = cond = present = None
        captions: list[str] = []
        keys: list[str] = []
        full: dict[str, Any] | None = None
        for sample in samples:
            try:
                pixels, cond_pixels, caption, mirror, sample_present = self.decoder.crops_present(sample)
            except Exception as error:
                self.skips(error)  # a skip reason: counted; anything else is raised
                continue
            self.skips.sample_decoded()
            if image is None or cond is None:
                image = np.empty((self.batch_size, *pixels.shape), np.uint8)
                cond = np.empty((self.batch_size, *cond_pixels.shape), np.uint8)
                if sample_present is not None:
                    present = np.empty((self.batch_size, *sample_present.shape), bool)
            _copy_into(image[len(keys)], pixels, mirror)
            _copy_into(cond[len(keys)], cond_pixels, mirror)
            if present is not None:
                present[len(keys)] = sample_present
            del pixels, cond_pixels  # the decoded arrays go before the held batch is handed on
            captions.append(caption)
            keys.append(sample["__key__"])
            if full is not None:
                yield full
                full = None
            if len(keys) == self.batch_size:
                full = _batch(image, cond, captions, keys, present)
                image = cond = present = None
                captions, keys = [], []
        if full is not None:
            yield full
        if keys and self.partial and image is not None and cond is not None:
            n = len(keys)
            yield _batch(
                image[:n].copy(),
                cond[:n].copy(),
                captions,
                keys,
                None if present is None else present[:n].copy(),
            )


def _copy_into(slot: np.ndarray, pixels: np.ndarray, mirror: bool) -> None:
    """Write ``pixels`` (mirrored left-right if ``mirror``) into the batch ``slot``."""
    if mirror:
        hflip(pixels, out=slot)
    else:
        slot[...] = pixels


def _batch(
    image: np.ndarray,
    cond: np.ndarray,
    captions: list[str],
    keys: list[str],
    present: np.ndarray | None = None,
) -> dict[str, Any]:
    """A batch dict of ``[B, H, W, C]`` uint8 arrays (as :func:`collate` lays it out), with a multi
    condition's ``present`` (bool ``[B, k]``) when given."""
    batch = {
        "image": torch.from_numpy(image).permute(0, 3, 1, 2),
        "condition": torch.from_numpy(cond).permute(0, 3, 1, 2),
        "caption": captions,
        "key": keys,
    }
    if present is not None:
        batch["present"] = torch.from_numpy(present)
    return batch


def _chw(array: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W]`` or ``[H, W, C]`` array -> ``[C, H, W]`` tensor over the same memory."""
    tensor = torch.from_numpy(array)
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)


def _stack_chw(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``[C, H, W]`` views of HWC memory -> ``[B, C, H, W]`` stored channels-last (``[B, H, W, C]``).

    One copy in memory order; stacking the ``[C, H, W]`` views as they are would transpose every
    sample on the CPU, which the float conversion on the device does for free.
    """
    return torch.stack([t.permute(1, 2, 0) for t in tensors]).permute(0, 3, 1, 2)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack decoded samples (``SampleDecoder`` outputs) into a batch dict (uint8 tensors stacked,
    strings as lists); the pipelines make the same batches with :class:`DecodeBatches`.

    ``image`` uint8 ``[B, 3, H, W]``, ``condition`` uint8 ``[B, C, H, W]``, both stored channels-last.
    Only the four sample fields are batched, and a multi condition's ``present`` (bool ``[B, k]``); the
    pipeline's last stage (``SkipCounter.attach``) then adds ``batch["data_counts"]``, which the module
    ignores and ``DataHealth`` reads.
    """
    batch = {
        "image": _stack_chw([s["image"] for s in samples]),
        "condition": _stack_chw([s["condition"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
    }
    if samples and "present" in samples[0]:
        batch["present"] = torch.stack([s["present"] for s in samples])
    return batch


# ------------------------------------------------------------------------------ model inputs
@cache
def _levels(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Float value of every uint8 level for the image (``v / 127.5 - 1``) and the condition
    (``v / 255``), computed on the CPU and then moved to ``device``.

    A lookup gives the same float32 values on every device: a GPU divides by a scalar as a
    multiplication with its reciprocal, which is one ulp off for half of the 256 levels.
    """
    levels = torch.arange(256, dtype=torch.float32)
    return (levels / 127.5 - 1.0).to(device), (levels / 255.0).to(device)


def _lookup(
    table: torch.Tensor, values: torch.Tensor, channels: int, name: str, stored: tuple[int, ...] | None = None
) -> torch.Tensor:
    """Contiguous float32 ``table[values]`` of uint8 ``[..., C, H, W]``, one channel repeated to ``channels``.

    ``stored``: the channel counts ``C`` accepted (default ``(1, channels)``; a multi condition's
    ``(3k,)``)."""
    if values.dtype != torch.uint8:
        raise TypeError(
            f"batch[{name!r}] is {values.dtype}, expected the uint8 that SampleDecoder/collate "
            "make: to_model_inputs converts a batch once"
        )
    stored = stored or (1, channels)
    if values.ndim < 3 or values.shape[-3] not in stored:
        expected = " or ".join(str(c) for c in stored)
        raise ValueError(f"batch[{name!r}] has shape {tuple(values.shape)}; expected [..., {expected}, H, W]")
    shape = (*values.shape[:-3], channels, *values.shape[-2:])
    index = values.expand(shape).to(torch.int32, memory_format=torch.contiguous_format)
    return table.index_select(0, index.view(-1)).view(shape)


def to_model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The model's float inputs of a uint8 batch (or sample), on the batch's device.

    Returns a new dict with every other field kept (``caption``, ``key``, ``data_counts``) and

    - ``image``: float32 ``[..., 3, H, W]`` in [-1, 1], ``v / 127.5 - 1``;
    - ``condition``: float32 ``[..., 3, H, W]`` in [0, 1], ``v / 255``, a single channel (canny)
      repeated to three; for a multi condition (a batch with ``present``, bool ``[..., k]``) float32
      ``[..., 3k, H, W]``, its uint8 ``condition`` having exactly ``3k`` channels (``present`` is kept);

    both contiguous and, on any device, bit-identical to ``v.float() / 127.5 - 1`` and ``v.float() / 255``
    computed on the CPU. ``ShardDataModule`` calls it after
    the batch reached the device; code that reads ``SampleDecoder``/``collate`` output without
    Lightning calls it itself.
    """
    image_levels, condition_levels = _levels(batch["image"].device)
    present = batch.get("present")
    channels = 3 if present is None else 3 * present.shape[-1]
    stored = None if present is None else (channels,)
    return {
        **batch,
        "image": _lookup(image_levels, batch["image"], 3, "image"),
        "condition": _lookup(condition_levels, batch["condition"], channels, "condition", stored),
    }


# ---------------------------------------------------------------------------------- pipelines
def train_pipeline(
    urls: list[str],
    decoder: SampleDecoder,
    *,
    batch_size: int,
    shuffle_buffer: int,
    resampled: bool,
    seed: int,
    skips: SkipCounter,
) -> wds.DataPipeline:
    """Training stream: resampled shards (or node- then worker-split shards), shuffle, decode, batch."""
    if resampled:
        source = [wds.ResampledShards(urls, seed=seed, worker_seed=_resample_seed, deterministic=True)]
    else:
        source = [
            wds.SimpleShardList(urls),
            wds.split_by_node,
            wds.split_by_worker,
            BufferShuffle(len(urls), seed),
        ]
    return wds.DataPipeline(
        *source,
        ShardReader(skips, decoder.limits),
        BufferShuffle(max(1, shuffle_buffer), seed),
        DecodeBatches(decoder, batch_size, partial=False, skips=skips),
        skips.attach,
    )


def eval_pipeline(
    urls: list[str], decoder: SampleDecoder, *, batch_size: int, skips: SkipCounter
) -> wds.DataPipeline:
    """Evaluation stream: every sample exactly once over all ranks and workers, in order, no shuffle."""
    split = EvalSplit(len(urls))
    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        split.shards,
        ShardReader(skips, decoder.limits),
        split.samples,
        DecodeBatches(decoder, batch_size, partial=True, skips=skips),
        skips.attach,
    )

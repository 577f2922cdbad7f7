"""Condition inputs for generation and evaluation: image files, folders of images, or shards.

Every input is resized and centre-cropped as the shards' validation samples are, so a condition gives the
model what it saw in training; shard inputs also carry the caption, the target image and (segmentation)
the label map. Shards are read by the one shard reader (``src.data.reader``: unsafe keys and oversized
members are skipped and counted); image files are checked against the pixel limit from their header and
named by a safe key (``src.data.schema.safe_key``), so every key is safe to build an output path from.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from src.data import schema
from src.data.pipeline import SampleDecoder, SkipCounter, resolve_shards, to_model_inputs
from src.data.reader import ShardReader
from src.data.transforms import resize_center_crop
from src.errors import ConfigError, InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class ConditionInput:
    """One condition to generate from; shards also give a caption and the target image (both in [0, 1])."""

    key: str
    condition: torch.Tensor
    caption: str | None = None
    target: torch.Tensor | None = None
    labels: np.ndarray | None = None


def read_condition_image(
    path: str | os.PathLike, resolution: int, condition: str, limits: schema.Limits = schema.LIMITS
) -> torch.Tensor:
    """A condition image file -> `[3, R, R]` in [0, 1], resized and centre-cropped as the shards' conditions.

    Raises `InputError` naming the file when it is not an image PIL can read, or when its header declares
    more than `limits.max_image_pixels` pixels (checked before decoding).
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            schema.check_pixels(*image.size, limits, f"condition file '{path}'")
            rgb = np.asarray(image.convert("RGB"))
    except schema.SampleError as error:
        raise InputError(str(error).split(": ", 1)[1]) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise InputError(
            f"condition file '{path}' is not a readable image ({type(error).__name__}: "
            f"{' '.join(str(error).split())[:200]}): give a PNG or JPEG condition image"
        ) from None
    return condition_from_rgb(rgb, resolution, condition)


def condition_from_rgb(rgb: np.ndarray, resolution: int, condition: str) -> torch.Tensor:
    """An RGB uint8 condition image [H, W, 3] -> `[3, R, R]` in [0, 1], resized and centre-cropped as the
    shards' conditions (nearest-neighbour for label-like maps, area for edge maps)."""
    rgb = resize_center_crop(rgb, resolution, schema.condition_spec(condition).interpolation)
    return torch.tensor(rgb).permute(2, 0, 1).float() / 255.0


def iter_shard_inputs(
    urls: Sequence[str], condition: str, resolution: int, skips: SkipCounter
) -> Iterator[ConditionInput]:
    """Samples of shards, in order, centre-cropped like validation (labels too, for segmentation)."""
    import webdataset as wds

    decoder = SampleDecoder(condition, resolution, train=False, random_flip=False, seed=0)

    def decode(sample: dict[str, Any]) -> ConditionInput:
        out = to_model_inputs(decoder(sample))
        labels = sample.get(schema.SEGLABEL)
        if labels is not None:
            labels = schema.decode_member(schema.SEGLABEL, labels, decoder.limits)
            labels = resize_center_crop(labels, resolution, "nearest")
        return ConditionInput(out["key"], out["condition"], out["caption"], (out["image"] + 1) / 2, labels)

    yield from wds.DataPipeline(
        wds.SimpleShardList(list(urls)),
        ShardReader(skips, decoder.limits),
        wds.map(decode, handler=skips),
    )


def collect_inputs(
    source: str | os.PathLike, condition: str, resolution: int, limit: int | None = None
) -> list[ConditionInput]:
    """Condition inputs from an image file, a folder of images, or a shard spec (tar, brace pattern, glob)."""
    path = Path(source).expanduser()
    skips = SkipCounter("condition")
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        inputs = [
            ConditionInput(schema.safe_key(path.stem), read_condition_image(path, resolution, condition))
        ]
    elif path.is_dir() and not any(path.glob("*.tar")):
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        names = unique_keys(p.relative_to(path).with_suffix("").as_posix() for p in files[:limit])
        inputs = [
            ConditionInput(key, read_condition_image(p, resolution, condition))
            for key, p in zip(names, files, strict=False)
        ]
    else:
        stream = iter_shard_inputs(resolve_shards(str(source), "condition"), condition, resolution, skips)
        inputs = [item for _, item in zip(range(limit or 2**62), stream, strict=False)]
    if not inputs:
        skipped = f" (skipped: {dict(skips.counts)})" if skips.counts else ""
        raise InputError(
            f"condition '{source}' holds no image ({', '.join(sorted(IMAGE_SUFFIXES))}) or readable shard "
            f"sample{skipped}"
        )
    return inputs[:limit]


def unique_keys(names: Iterable[str]) -> list[str]:
    """Safe, distinct keys of file names (relative paths): `schema.safe_key`, then `-1`, `-2`... on clashes."""
    keys: list[str] = []
    taken: set[str] = set()
    for name in names:
        key, index = schema.safe_key(name), 0
        while key in taken:
            index += 1
            key = schema.safe_key(f"{name}-{index}")
        keys.append(key)
        taken.add(key)
    return keys


def assign_prompts(inputs: Sequence[ConditionInput], prompt: str | Sequence[str] | None) -> list[str]:
    """One prompt per input: a single prompt for all, one per input, or (None) the shards' captions."""
    if prompt is None:
        missing = [item.key for item in inputs if item.caption is None]
        if missing:
            raise ConfigError(
                f"no prompt for {missing[:3]}: image conditions carry no caption, give prompt='...'"
            )
        return [str(item.caption) for item in inputs]
    prompts = [prompt] if isinstance(prompt, str) else [str(p) for p in prompt]
    if len(prompts) not in (1, len(inputs)):
        raise ConfigError(
            f"{len(prompts)} prompts for {len(inputs)} conditions: give one prompt, or one per condition"
        )
    return prompts * len(inputs) if len(prompts) == 1 else prompts


def batched(items: Iterable[ConditionInput], size: int) -> Iterator[list[ConditionInput]]:
    """Consecutive lists of `size` inputs (the last one shorter)."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch

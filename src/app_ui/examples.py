"""The app's examples: the first validation conditions of the run, with their captions as prompts.

A model of several conditions gets `MultiExample`s: for runs composed with `run=[A,B]`, each run's own
validation conditions (they fill that run's condition inputs only); for one run (or list entry) of several
conditions, every condition of its validation samples (a member missing from a sample is zeros).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from src.app_ui.conditions import to_uint8
from src.data.inputs import ConditionInput, iter_shard_inputs
from src.data.pipeline import SkipCounter
from src.data.schema import key_path
from src.models.exported import is_exported
from src.models.inference import describe_source
from src.models.multi import split_condition
from src.models.run import validation_shards

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """A condition image written as PNG, the prompt to go with it, and (segmentation) its label map."""

    image: Path
    prompt: str
    labels: np.ndarray | None = None


def validation_inputs(
    source: str | os.PathLike, checkpoint: str | None, condition: str, resolution: int, count: int
) -> list[ConditionInput]:
    """The first `count` validation samples of the run (none for an exported folder, which has no data)."""
    if count <= 0:
        return []
    if is_exported(source):
        log.info("no examples: an exported folder carries no validation data")
        return []
    try:
        urls = validation_shards(source, checkpoint)
    except ValueError:
        log.info("no examples: the run was trained without validation shards")
        return []
    return list(itertools.islice(iter_shard_inputs(urls, condition, resolution, SkipCounter()), count))


def write_examples(inputs: list[ConditionInput], folder: str | os.PathLike) -> list[Example]:
    """Write every input's condition as `folder/<key>.png` (uint8, exactly the tensor's pixels)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    examples = []
    for item in inputs:
        path = key_path(folder, item.key, ".png")
        Image.fromarray(to_uint8(item.condition)).save(path)
        examples.append(Example(path, str(item.caption or ""), item.labels))
    return examples


@dataclass(frozen=True)
class MultiExample:
    """Condition images of one validation sample by condition name (some of a multi model's conditions:
    those of the run `source` it comes from), written as PNG, and its prompt."""

    images: dict[str, Path]
    prompt: str
    source: str


def multi_examples(
    source: str | os.PathLike | Sequence[str],
    checkpoint: str | None,
    resolution: int,
    count: int,
    folder: str | os.PathLike,
) -> list[MultiExample]:
    """The first `count` validation samples of each run of `source` (one run, or a list composed), every
    condition of each written as `folder/<run index>-<name>/<key>.png` (uint8, exactly the tensor's pixels)."""
    from PIL import Image

    sources = [source] if isinstance(source, str | os.PathLike) else list(source)
    examples = []
    for index, run in enumerate(sources):
        condition, _ = describe_source(run, checkpoint)
        names = split_condition(condition)
        for item in validation_inputs(run, checkpoint, condition, resolution, count):
            images = {}
            for i, name in enumerate(names):
                place = Path(folder) / f"{index}-{name}"
                place.mkdir(parents=True, exist_ok=True)
                images[name] = key_path(place, item.key, ".png")
                Image.fromarray(to_uint8(item.condition[3 * i : 3 * i + 3])).save(images[name])
            examples.append(MultiExample(images, str(item.caption or ""), str(run)))
    return examples

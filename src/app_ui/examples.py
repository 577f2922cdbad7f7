"""The app's examples: the first validation conditions of the run, with their captions as prompts."""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from src.app_ui.conditions import to_uint8
from src.data.inputs import ConditionInput, iter_shard_inputs
from src.data.pipeline import SkipCounter
from src.data.schema import key_path
from src.models.exported import is_exported
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

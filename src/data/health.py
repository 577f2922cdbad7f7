"""Named, counted data-health policy: what is skipped, what is only noted, and how counts travel.

Two kinds of events are counted by reason:

- **skips** drop a sample (or the rest of a shard) and count towards the skip fraction that
  ``src.callbacks.data_health.DataHealth`` limits:

  | reason               | cause                                                                  |
  |----------------------|------------------------------------------------------------------------|
  | ``missing_<member>`` | the sample lacks ``jpg``, ``txt`` or the task's condition              |
  | ``missing_condition``| a multi-condition sample (``canny+seg``) with none of its conditions   |
  | ``truncated_image``  | a JPEG/PNG member without its end marker (cut-off bytes)               |
  | ``undecodable_image``| image bytes that cv2 cannot decode, or without a header giving a size  |
  | ``empty_member``     | a zero-byte image or json member                                       |
  | ``image_too_large``  | an image header declaring more than ``data.max_image_pixels`` pixels  |
  | ``allocation_failed``| memory for decoding could not be allocated                             |
  | ``size_mismatch``    | condition and image of different height/width                          |
  | ``undecodable_text`` | a caption that is not UTF-8                                            |
  | ``caption_too_long`` | a caption over ``data.max_caption_chars`` characters                   |
  | ``member_too_large`` | a tar member over ``data.max_member_bytes`` bytes (never read)         |
  | ``unsafe_key``       | a key that is absolute, holds ``..``, a separator or other characters  |
  | ``dotted_key``       | a key with a dot (its members would be scattered over wrong samples)   |
  | ``duplicate_member`` | the same member twice in one sample                                    |
  | ``link_member``      | a symbolic or hard link member (never followed)                        |
  | ``device_member``    | a device, fifo or other special member                                 |
  | ``shard_missing``    | a shard that vanished after the URL list was resolved                  |
  | ``shard_read_error`` | a truncated or corrupt tar (the rest of that shard is lost)            |

  Header-level reasons (``unsafe_key`` ... ``member_too_large``) are decided by
  ``src.data.reader.ShardReader`` from the tar headers, before a byte of the sample is read.

- **notes** keep the sample: ``empty_caption`` (an empty prompt is legitimate training data:
  ControlNet-style training drops captions on purpose, and the module does too),
  ``unexpected_member`` (a tar member outside the schema, e.g. ``.pyd``/``.pickle``: never read,
  never unpickled; the sample's schema members are used as usual) and ``partial_condition`` (a
  multi-condition sample that lacks some, not all, of its conditions: they are zeros and
  ``batch["present"]`` says which).

A shard-level event counts once, although it may cost many samples (webdataset may also report one
broken tar twice), so the skip fraction of broken shards is a lower bound.

Counts reach the main process inside the batches: every batch carries ``batch["data_counts"]``, a flat
``dict[str, int]`` of the events in *that worker* since its previous batch (``decoded``,
``skipped/<reason>``, ``noted/<reason>``). Events after a worker's last batch of a pass are not
reported; a skip is reported with the batch that the worker hands on next (the batcher reads one
sample ahead), and the sum over batches is exact. A worker that sees ``max_consecutive_skips`` skips
in a row without one decoded sample raises :class:`DataHealthError` (every shard gone, or all samples
bad with resampled shards, would otherwise spin forever without producing a batch).
"""

from __future__ import annotations

import logging
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from src.data import schema
from src.errors import DataError

log = logging.getLogger(__name__)

COUNTS_KEY = "data_counts"
DECODED = "decoded"
SKIPPED = "skipped/"
NOTED = "noted/"
EMPTY_CAPTION = "empty_caption"
UNEXPECTED_MEMBER = "unexpected_member"
PARTIAL_CONDITION = "partial_condition"


class DataHealthError(DataError):
    """The data is too broken to go on (skip fraction over its limit, or nothing readable)."""


def skip_reason(exn: Exception) -> str | None:
    """The named reason of a skippable error, or None when the error is a bug that must be raised."""
    if isinstance(exn, schema.SampleError):
        return exn.reason
    if isinstance(exn, MemoryError):
        return "allocation_failed"
    if isinstance(exn, FileNotFoundError):
        return "shard_missing"
    if isinstance(exn, (OSError, EOFError, tarfile.TarError)):
        return "shard_read_error"
    return None


def skip_fraction(counts: Mapping[str, int]) -> tuple[float, int, int]:
    """``(fraction, skipped, seen)`` of summed data counts, where ``seen = decoded + skipped``."""
    skipped = sum(v for k, v in counts.items() if k.startswith(SKIPPED))
    seen = counts.get(DECODED, 0) + skipped
    return (skipped / seen if seen else 0.0), skipped, seen


def top_reasons(counts: Mapping[str, int], prefix: str = SKIPPED, n: int = 3) -> str:
    """The ``n`` most frequent reasons under ``prefix``, e.g. ``"undecodable_image 30, shard_missing 2"``."""
    reasons = Counter({k[len(prefix) :]: v for k, v in counts.items() if k.startswith(prefix) and v})
    return ", ".join(f"{reason} {count}" for reason, count in reasons.most_common(n)) or "none"


class SkipCounter:
    """Named, counted skip policy: a webdataset ``handler`` plus the pipeline stages that count.

    ``counts``/``notes`` hold this process's totals by reason (with DataLoader workers each worker has
    its own copy); ``take()`` returns and resets the events since the previous call, which the
    pipeline attaches to every batch. Every event is logged: the first three per reason at WARNING,
    then every 1000th. Errors without a skip reason (:func:`skip_reason`) are bugs and are raised.
    """

    def __init__(self, name: str = "data", max_consecutive_skips: int = 100_000) -> None:
        self.name, self.max_consecutive_skips = name, max_consecutive_skips
        self.counts: Counter[str] = Counter()
        self.notes: Counter[str] = Counter()
        self.decoded = 0
        self._pending: Counter[str] = Counter()
        self._consecutive = 0

    def __call__(self, exn: Exception) -> bool:
        reason = skip_reason(exn)
        if reason is None:
            raise exn
        self.counts[reason] += 1
        self._pending[SKIPPED + reason] += 1
        self._consecutive += 1
        self._log("skipped a sample", reason, self.counts[reason], exn)
        if self._consecutive >= self.max_consecutive_skips:
            raise DataHealthError(
                f"{self.name}: {self._consecutive} skips in a row without one readable sample "
                f"(this process: {top_reasons(Counter({SKIPPED + k: v for k, v in self.counts.items()}))}); "
                "are the shards gone or all broken?"
            ) from exn
        return True

    def note(self, reason: str, detail: object = "") -> None:
        """Count an event that keeps the sample (e.g. an empty caption)."""
        self.notes[reason] += 1
        self._pending[NOTED + reason] += 1
        self._log("noted", reason, self.notes[reason], detail)

    def _log(self, what: str, reason: str, count: int, detail: object) -> None:
        if count <= 3 or count % 1000 == 0:
            log.warning("%s: %s (%s, %d so far): %s", self.name, what, reason, count, detail)

    def sample_decoded(self) -> None:
        """A decoded sample ends a run of consecutive skips (called by the batching stage)."""
        self._consecutive = 0

    def take(self) -> dict[str, int]:
        """The events since the previous call (``decoded``, ``skipped/...``, ``noted/...``), then reset."""
        pending, self._pending = dict(self._pending), Counter()
        return pending

    def attach(self, batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Pipeline stage after batching: count the batch's samples, empty captions and (multi
        condition) samples with some conditions missing, then ``batch["data_counts"] = take()``.

        Counting delivered samples here (not at decoding) keeps ``decoded`` exact per batch: the
        batcher reads one sample ahead, and samples of a dropped incomplete last batch are not counted.
        """
        for batch in batches:
            self.decoded += len(batch["key"])
            self._pending[DECODED] += len(batch["key"])
            for key, caption in zip(batch["key"], batch["caption"], strict=True):
                if not caption.strip():
                    self.note(EMPTY_CAPTION, key)
            if "present" in batch:
                for key, row in zip(batch["key"], batch["present"].tolist(), strict=True):
                    if not all(row):
                        self.note(PARTIAL_CONDITION, f"{key}: present {row}")
            batch[COUNTS_KEY] = self.take()
            yield batch

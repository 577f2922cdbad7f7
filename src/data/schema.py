"""The shard schema: one sample is the tar members sharing a key (docs/design.md, "Shard schema").

Writers (``data_prep``) and the reader (``src.data.datamodule``) both go through this module, so the
member names, their encodings and the condition-to-member mapping live in exactly one place.

| member            | kind          | content                                              |
|-------------------|---------------|------------------------------------------------------|
| ``jpg``           | ``rgb_jpeg``  | target image, RGB, JPEG                              |
| ``txt``           | ``text``      | caption, UTF-8                                       |
| ``canny.png``     | ``gray_png``  | canny edge map, single channel, values 0/255         |
| ``seg.png``       | ``rgb_png``   | segmentation as the ADE20K colour palette, RGB       |
| ``seglabel.png``  | ``label_png`` | class indices (uint8/uint16), single channel         |
| ``landmarks.png`` | ``rgb_png``   | rendered face landmarks, RGB                         |
| ``landmarks.json``| ``json``      | landmark coordinates                                 |
| ``json``          | ``json``      | metadata: source, source_id, width, height, settings |

Only these members are ever decoded; anything else in a shard (``.pyd``, ``.pickle``...) is ignored
without being read, so no pickle is ever loaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

SCHEMA_VERSION = 1

IMAGE = "jpg"
CAPTION = "txt"
META = "json"
CANNY = "canny.png"
SEG = "seg.png"
SEGLABEL = "seglabel.png"
LANDMARKS = "landmarks.png"
LANDMARKS_JSON = "landmarks.json"

#: member name -> kind of encoding; the order is the order members are written in a tar.
MEMBERS: dict[str, str] = {
    IMAGE: "rgb_jpeg",
    CAPTION: "text",
    META: "json",
    CANNY: "gray_png",
    SEG: "rgb_png",
    SEGLABEL: "label_png",
    LANDMARKS: "rgb_png",
    LANDMARKS_JSON: "json",
}

#: members every sample must carry, whatever its conditions.
REQUIRED: tuple[str, ...] = (IMAGE, CAPTION, META)

JPEG_QUALITY = 95
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class SampleError(ValueError):
    """A sample that cannot be used; ``reason`` is a short name used for skip counts."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ConditionSpec:
    """How a task's condition is stored and read.

    Attributes:
        member: tar member holding the condition image.
        channels: channels stored in the member (1 is replicated to 3 when read).
        interpolation: ``"nearest"`` for label-like maps (colour palettes, renderings), ``"area"`` for
            edge maps, where nearest-neighbour downscaling would drop thin edges.
        flippable: whether a horizontal flip keeps the condition valid. Not for face landmarks: the
            rendering colours the left and right eye/brow differently, and a mirror swaps them.
    """

    member: str
    channels: int
    interpolation: str
    flippable: bool = True


CONDITIONS: dict[str, ConditionSpec] = {
    "canny": ConditionSpec(CANNY, channels=1, interpolation="area"),
    "seg": ConditionSpec(SEG, channels=3, interpolation="nearest"),
    "landmarks": ConditionSpec(LANDMARKS, channels=3, interpolation="nearest", flippable=False),
}


def condition_spec(condition: str) -> ConditionSpec:
    """Return the spec of a task condition, or raise a ValueError naming the supported ones."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; supported: {sorted(CONDITIONS)}")
    return CONDITIONS[condition]


# ---------------------------------------------------------------------------------------------- keys
def check_key(key: str) -> str:
    """Return ``key`` if it is a valid sample key (letters, digits, ``_`` and ``-``; no dots)."""
    if not _KEY_RE.match(key):
        raise ValueError(f"invalid sample key {key!r}: use only letters, digits, '_' and '-' (no dots)")
    return key


def make_key(dataset: str, source_id: str) -> str:
    """Deterministic key from a dataset name and a source id; other characters become ``_``."""
    return check_key(re.sub(r"[^A-Za-z0-9_-]", "_", f"{dataset}_{source_id}"))


def split_member_name(name: str) -> tuple[str, str]:
    """Split a tar member name ``KEY.EXT`` at the first dot, as webdataset does."""
    key, dot, ext = name.partition(".")
    if not dot or "/" in key:
        raise ValueError(f"tar member {name!r} is not KEY.EXT")
    return key, ext


def is_known_member(name: str) -> bool:
    """True if a tar member name's extension is in the schema (used to skip everything else unread)."""
    key, dot, ext = name.rpartition("/")[-1].partition(".")
    return bool(dot) and ext.lower() in MEMBERS


# ------------------------------------------------------------------------------------------ encoders
def _as_uint8(array: np.ndarray, channels: int, what: str) -> np.ndarray:
    """Check dtype and channel count of an image array."""
    if array.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8, got {array.dtype}")
    shape_ok = array.ndim == 2 if channels == 1 else array.ndim == 3 and array.shape[2] == channels
    if not shape_ok:
        raise ValueError(f"{what} must have {channels} channel(s), got shape {array.shape}")
    return array


def _imencode(ext: str, array: np.ndarray, params: list[int] | None = None) -> bytes:
    """cv2.imencode that raises instead of returning False."""
    ok, buf = cv2.imencode(ext, array, params or [])
    if not ok:
        raise ValueError(f"could not encode {ext} of shape {array.shape}")
    return buf.tobytes()


def encode_member(member: str, value: Any) -> bytes:
    """Encode a value for a schema member: RGB/gray uint8 arrays, label arrays, str, or JSON data."""
    kind = MEMBERS.get(member)
    if kind == "rgb_jpeg":
        rgb = _as_uint8(value, 3, member)
        return _imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if kind == "rgb_png":
        return _imencode(".png", _as_uint8(value, 3, member)[..., ::-1])
    if kind == "gray_png":
        return _imencode(".png", _as_uint8(value, 1, member))
    if kind == "label_png":
        if value.ndim != 2 or value.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"{member} must be a 2-D uint8/uint16 array, got {value.dtype} {value.shape}")
        return _imencode(".png", value)
    if kind == "text":
        return str(value).encode("utf-8")
    if kind == "json":
        return json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")
    raise ValueError(f"{member!r} is not a schema member; known: {list(MEMBERS)}")


# ------------------------------------------------------------------------------------------ decoders
def _imdecode(data: bytes, flags: int, member: str) -> np.ndarray:
    """cv2.imdecode that raises SampleError('undecodable_image') on failure."""
    array = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    if array is None:
        raise SampleError("undecodable_image", f"{member} ({len(data)} bytes)")
    return array


def check_complete(member: str, data: bytes) -> None:
    """Raise SampleError('truncated_image') if an image member starts well but lacks its end marker.

    A JPEG (``FF D8`` ...) ends with EOI ``FF D9`` (tolerated up to 1 KiB before the end, for padding
    or maker data: ``FF D9`` cannot occur inside entropy-coded data), a PNG with its ``IEND`` chunk.
    Some decoders return a partly grey image for a cut-off file instead of failing; this check does not
    depend on the decoder. Bytes that are no JPEG/PNG at all are left to the decoder to reject.
    """
    kind = MEMBERS.get(member, "")
    if kind == "rgb_jpeg" and data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-1024:]:
        raise SampleError("truncated_image", f"{member}: no JPEG end marker ({len(data)} bytes)")
    if kind.endswith("_png") and data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in data[-32:]:
        raise SampleError("truncated_image", f"{member}: no PNG IEND chunk ({len(data)} bytes)")


def decode_member(member: str, data: bytes) -> Any:
    """Decode one member's bytes: images to uint8 numpy arrays (RGB order), text to str, json to data.

    Images are decoded with ``IMREAD_IGNORE_ORIENTATION`` so pixels are exactly as stored; colour
    images straight to RGB order (``IMREAD_COLOR_RGB``: the codec writes RGB, no channel-reversal copy;
    the same pixels as BGR decoding reversed). Cut-off images raise ``SampleError('truncated_image')``,
    undecodable ones ``'undecodable_image'``, non-UTF-8 text ``'undecodable_text'``.
    """
    kind = MEMBERS.get(member)
    check_complete(member, data)
    raw = cv2.IMREAD_IGNORE_ORIENTATION
    if kind in ("rgb_jpeg", "rgb_png"):
        return _imdecode(data, cv2.IMREAD_COLOR_RGB | raw, member)
    if kind == "gray_png":
        return _imdecode(data, cv2.IMREAD_GRAYSCALE | raw, member)
    if kind == "label_png":
        return _imdecode(data, cv2.IMREAD_UNCHANGED | raw, member)
    try:
        if kind == "text":
            return data.decode("utf-8")
        if kind == "json":
            return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise SampleError(f"undecodable_{kind}", f"{member}: {exn}") from exn
    raise ValueError(f"{member!r} is not a schema member; known: {list(MEMBERS)}")


def check_members(names: list[str] | tuple[str, ...]) -> None:
    """Check the member names of a sample about to be written: required ones present, no unknown ones."""
    missing = [m for m in REQUIRED if m not in names]
    unknown = [m for m in names if m not in MEMBERS]
    if missing or unknown:
        raise ValueError(f"sample has missing members {missing} / unknown members {unknown}")


def check_same_size(image: np.ndarray, conditions: dict[str, np.ndarray]) -> None:
    """Check that every condition array has the target image's height and width."""
    for name, array in conditions.items():
        if array.shape[:2] != image.shape[:2]:
            raise ValueError(f"{name} has size {array.shape[:2]}, image has {image.shape[:2]}")

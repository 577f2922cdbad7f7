"""The shard schema: one sample is the tar members sharing a key (docs/design.md, "Shard schema").

Writers (the converters) and the reader (``src.data.datamodule``) both go through this module, so the
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

**Keys** are checked here, once, for every reader and writer (:func:`check_key`): letters, digits, ``_``
and ``-``, at most :data:`MAX_KEY_CHARS` characters, so a key is never absolute, never holds ``..`` or a
path separator, and every path built from one (:func:`key_path`) stays inside its folder.

**Limits** (:class:`Limits`, the ``data.max_*`` config keys) bound what one sample may cost before its
bytes are read or decoded: bytes per member (from the tar header), pixels per image (from the PNG/JPEG
header) and characters per caption.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from src.errors import ConfigError

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
MAX_KEY_CHARS = 200
_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")

#: Default limits (``data.max_member_bytes``, ``data.max_image_pixels``, ``data.max_caption_chars``).
MAX_MEMBER_BYTES = 64 * 2**20
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_CAPTION_CHARS = 10_000


class SampleError(ValueError):
    """A sample that cannot be used; ``reason`` is a short name used for skip counts."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """What one sample may cost; over a limit the sample is skipped and counted before the expensive part.

    Attributes:
        max_member_bytes: bytes of one tar member, checked from its tar header before it is read
            (``member_too_large``).
        max_image_pixels: width x height of one image, checked from its PNG/JPEG header before it is
            decoded (``image_too_large``); the converters apply the same limit to their source images.
        max_caption_chars: characters of a caption (``caption_too_long``; a caption member of more than
            4 bytes per allowed character is refused from its tar header, unread).
    """

    max_member_bytes: int = MAX_MEMBER_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_caption_chars: int = MAX_CAPTION_CHARS

    def __post_init__(self) -> None:
        for name in ("max_member_bytes", "max_image_pixels", "max_caption_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"data.{name} must be a positive integer, got {value!r}")


LIMITS = Limits()


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
        raise ConfigError(f"unknown condition {condition!r}; supported: {sorted(CONDITIONS)}")
    return CONDITIONS[condition]


#: joins the names of a multi-condition task (``"canny+seg"``), in the order their channels are stacked.
CONDITION_SEPARATOR = "+"


def condition_names(condition: str) -> list[str]:
    """The condition names of a task's ``condition``, in order: ``"canny"`` -> ``["canny"]``,
    ``"canny+seg"`` -> ``["canny", "seg"]`` (a multi condition: one 3-channel block per name, in this order).

    Raises a one-line ConfigError naming the bad value and the supported names for an unknown name, an
    empty name (``""``, ``"canny+"``) or a name given twice (``"canny+canny"``).
    """
    hint = f"supported: {sorted(CONDITIONS)}, one or several joined by '+' (e.g. 'canny+seg')"
    if not isinstance(condition, str):
        raise ConfigError(f"condition must be a string, got {condition!r}; {hint}")
    names = condition.split(CONDITION_SEPARATOR)
    for name in names:
        if not name.strip():
            raise ConfigError(f"condition {condition!r} has an empty name; {hint}")
        if name not in CONDITIONS:
            within = f" in {condition!r}" if len(names) > 1 else ""
            raise ConfigError(f"unknown condition {name!r}{within}; {hint}")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ConfigError(f"condition {condition!r} names {twice[0]!r} more than once; {hint}")
    return names


# ---------------------------------------------------------------------------------------------- keys
def check_key(key: object) -> str:
    """Return ``key`` if it is a safe sample key, else raise ``SampleError('unsafe_key')``.

    The one key check of every reader and writer: letters, digits, ``_`` and ``-`` only (no dots), 1 to
    :data:`MAX_KEY_CHARS` characters. Such a key is never absolute, never contains ``..`` or a path
    separator, and makes a valid file name on every platform.
    """
    if isinstance(key, str) and len(key) <= MAX_KEY_CHARS and _KEY_RE.fullmatch(key):
        return key
    text = repr(key)[:120]
    if not isinstance(key, str) or not key:
        why = "it is empty"
    elif os.path.isabs(key) or key.startswith(("\\", "~")):
        why = "it is an absolute path"
    elif ".." in key.replace("\\", "/").split("/"):
        why = "it climbs out of its folder ('..')"
    elif "/" in key or "\\" in key:
        why = "it contains a path separator"
    elif len(key) > MAX_KEY_CHARS:
        why = f"it is longer than {MAX_KEY_CHARS} characters"
    else:
        why = "it has characters outside letters, digits, '_' and '-'"
    raise SampleError(
        "unsafe_key", f"invalid sample key {text}: {why}; use only letters, digits, '_' and '-' (no dots)"
    )


def make_key(dataset: str, source_id: str) -> str:
    """Deterministic key from a dataset name and a source id; other characters become ``_``."""
    return check_key(re.sub(r"[^A-Za-z0-9_-]", "_", f"{dataset}_{source_id}"))


def safe_key(text: str) -> str:
    """A safe key made of any text (e.g. a file name): other characters become ``_``, cut to length."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)[:MAX_KEY_CHARS] or "_"


def key_path(folder: str | os.PathLike, key: str, suffix: str = "") -> Path:
    """``folder / (key + suffix)``: the one way to build a path from a sample key.

    The key must pass :func:`check_key` and the suffix (``"_00.png"``) may not hold a separator or
    ``..``, so the path is always a file directly inside ``folder``.
    """
    check_key(key)
    if "/" in suffix or "\\" in suffix or ".." in suffix:
        raise ValueError(f"file name suffix {suffix!r} must not contain a path separator or '..'")
    return Path(folder) / f"{key}{suffix}"


def split_member_name(name: str) -> tuple[str, str]:
    """Split a tar member name ``KEY.EXT`` at the first dot of its base name, as webdataset does
    (``dir/k.canny.png`` -> ``("dir/k", "canny.png")``); the extension is lower-cased. The key is not
    checked here (see :func:`check_key`). Raises ValueError for a name without a dot."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        raise ValueError(f"tar member {name!r} is not KEY.EXT")
    return (f"{head}/{stem}" if head or name.startswith("/") else stem), ext.lower()


def is_known_member(name: str) -> bool:
    """True if a tar member name's extension is in the schema (used to skip everything else unread)."""
    key, dot, ext = name.rpartition("/")[-1].partition(".")
    return bool(dot) and ext.lower() in MEMBERS


def dotted_member(ext: str) -> str | None:
    """The schema member an unknown extension ends with (``"v2.jpg"`` -> ``"jpg"``): the member of a key
    that has a dot, whose sample webdataset's first-dot rule would lose; None otherwise."""
    return next((m for m in MEMBERS if ext.endswith(f".{m}")), None)


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
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): they carry the image size
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a JPEG's start-of-frame segment, walking the segments before it."""
    index, end = 2, len(data)
    while index + 4 <= end:
        if data[index] != 0xFF:
            return None
        marker = data[index + 1]
        if marker == 0xFF:  # fill byte
            index += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # segments without a length
            index += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        if marker in _JPEG_SOF:
            if index + 9 > end:
                return None
            height, width = struct.unpack(">HH", data[index + 5 : index + 9])
            return width, height
        index += 2 + struct.unpack(">H", data[index + 2 : index + 4])[0]
    return None


def image_header_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` an image's header declares, read without decoding: PNG (IHDR) and JPEG (SOF)
    directly, other formats through PIL's lazy header parsing; None if no header says."""
    if data[:8] == _PNG_SIGNATURE:
        if len(data) >= 24 and data[12:16] == b"IHDR":
            width, height = struct.unpack(">II", data[16:24])
            return width, height
        return None
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            return image.size
    except Exception:  # noqa: BLE001 - whatever PIL cannot identify has no size we can trust
        return None


def check_pixels(width: int, height: int, limits: Limits, what: str) -> None:
    """Raise ``SampleError('image_too_large')`` if ``width x height`` is over ``limits.max_image_pixels``."""
    if width * height > limits.max_image_pixels:
        raise SampleError(
            "image_too_large",
            f"{what}: {width}x{height} = {width * height} pixels, over the limit of {limits.max_image_pixels} "
            "(data.max_image_pixels)",
        )


def _imdecode(data: bytes, flags: int, member: str, limits: Limits) -> np.ndarray:
    """cv2.imdecode behind the size checks; failures become named SampleErrors.

    Zero bytes are ``empty_member``; a header over ``limits.max_image_pixels`` is ``image_too_large``
    (checked before anything is allocated); a failed allocation is ``allocation_failed``; anything else
    cv2 cannot decode (or whose size no header declares) is ``undecodable_image``.
    """
    if not data:
        raise SampleError("empty_member", f"{member} has zero bytes")
    size = image_header_size(data)
    if size is None:
        raise SampleError("undecodable_image", f"{member} ({len(data)} bytes): no image header with a size")
    check_pixels(*size, limits, member)
    try:
        array = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except MemoryError as exn:
        raise SampleError("allocation_failed", f"{member}: {size[0]}x{size[1]} pixels") from exn
    except cv2.error as exn:
        text = str(exn).lower()
        reason = "allocation_failed" if "alloc" in text or "memory" in text else "undecodable_image"
        raise SampleError(
            reason, f"{member} ({len(data)} bytes): {' '.join(str(exn).split())[:200]}"
        ) from exn
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


def decode_member(member: str, data: bytes, limits: Limits = LIMITS) -> Any:
    """Decode one member's bytes: images to uint8 numpy arrays (RGB order), text to str, json to data.

    Images are decoded with ``IMREAD_IGNORE_ORIENTATION`` so pixels are exactly as stored; colour
    images straight to RGB order (``IMREAD_COLOR_RGB``: the codec writes RGB, no channel-reversal copy;
    the same pixels as BGR decoding reversed). Cut-off images raise ``SampleError('truncated_image')``,
    undecodable ones ``'undecodable_image'``, zero-byte images and json ``'empty_member'``, images over
    ``limits.max_image_pixels`` ``'image_too_large'``, failed allocations ``'allocation_failed'``,
    non-UTF-8 text ``'undecodable_text'`` and captions over ``limits.max_caption_chars``
    ``'caption_too_long'`` (an empty caption is valid).
    """
    kind = MEMBERS.get(member)
    check_complete(member, data)
    raw = cv2.IMREAD_IGNORE_ORIENTATION
    if kind in ("rgb_jpeg", "rgb_png"):
        return _imdecode(data, cv2.IMREAD_COLOR_RGB | raw, member, limits)
    if kind == "gray_png":
        return _imdecode(data, cv2.IMREAD_GRAYSCALE | raw, member, limits)
    if kind == "label_png":
        return _imdecode(data, cv2.IMREAD_UNCHANGED | raw, member, limits)
    if kind == "text" and len(data) > 4 * limits.max_caption_chars:  # more characters, whatever the text
        raise SampleError("caption_too_long", f"{member}: {len(data)} bytes (data.max_caption_chars)")
    if kind == "json" and not data:
        raise SampleError("empty_member", f"{member} has zero bytes")
    try:
        if kind == "text":
            text = data.decode("utf-8")
            if len(text) > limits.max_caption_chars:
                raise SampleError(
                    "caption_too_long",
                    f"{member}: {len(text)} characters, over the limit of {limits.max_caption_chars} "
                    "(data.max_caption_chars)",
                )
            return text
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

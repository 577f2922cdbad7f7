"""Optional caption sources for datasets that do not ship captions (ADE20K, face folders).

A captions source is either

- a JSON file mapping an image name to a caption or a list of captions, where the name is the image's
  path relative to the image folder, with or without its extension, or its file name or stem; or
- a folder of ``{stem}.txt`` files with one caption per line (the layout of CelebA-HQ caption sets
  such as Multi-Modal-CelebA-HQ's ``celeba-caption/``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any

from src.errors import InputError, MissingInputError


def read_json(path: str | Path, option: str) -> Any:
    """A JSON file given on the command line (``option``, e.g. ``--captions``); a missing, unreadable or
    malformed file is one ``InputError`` line naming the file and what is wrong with it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MissingInputError(f"{option} {path} does not exist") from None
    except UnicodeDecodeError as error:
        raise InputError(
            f"{option} {path} is not UTF-8 text (byte {error.start} is 0x{error.object[error.start]:02x})"
        ) from None
    except OSError as error:
        raise InputError(f"{option} {path} cannot be read: {error.strerror or error}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(
            f"{option} {path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}"
        ) from None


def inside(folder: str | Path, relative: object) -> Path | None:
    """``folder / relative`` when ``relative`` is a relative path that stays inside ``folder`` (no
    absolute path, no ``..``), else None: the converters never open a listed file outside their input
    folder."""
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        return None
    norm = relative.replace("\\", "/")
    parts = PurePosixPath(norm)
    if parts.is_absolute() or ".." in parts.parts or norm[1:3] == ":/" or not parts.parts:
        return None
    return Path(folder) / parts


def _clean(texts: str | list[str]) -> tuple[str, ...]:
    """Whitespace-normalised, non-empty captions."""
    items = [texts] if isinstance(texts, str) else list(texts)
    return tuple(" ".join(t.split()) for t in items if t and t.strip())


def load_captions(source: str | Path | None) -> dict[str, tuple[str, ...]]:
    """Read a captions source (see the module docstring) into ``name -> captions``; None gives {}."""
    if source is None:
        return {}
    path = Path(source)
    if path.is_dir():
        texts = {}
        for file in sorted(path.glob("*.txt")):
            try:
                texts[file.stem] = _clean(file.read_text(encoding="utf-8").splitlines())
            except UnicodeDecodeError as error:
                raise InputError(f"--captions {file} is not UTF-8 text (byte {error.start})") from None
        return texts
    if not path.is_file():
        raise MissingInputError(f"--captions {path} is neither a JSON file nor a folder of .txt files")
    data = read_json(path, "--captions")
    if not isinstance(data, dict):
        raise InputError(
            f"--captions {path}: expected a JSON object mapping image names to captions, got {type(data).__name__}"
        )
    for name, texts in data.items():
        if not isinstance(texts, str) and not (
            isinstance(texts, list) and all(isinstance(t, str) for t in texts)
        ):
            raise InputError(
                f"--captions {path}: the captions of {name!r} must be a string or a list of strings, "
                f"got {type(texts).__name__}"
            )
    return {str(name): _clean(texts) for name, texts in data.items()}


def captions_for(captions: dict[str, tuple[str, ...]], relative: Path) -> tuple[str, ...]:
    """Captions of an image given its path relative to the image folder (several name forms tried)."""
    for name in (relative.as_posix(), relative.with_suffix("").as_posix(), relative.name, relative.stem):
        if captions.get(name):
            return captions[name]
    return ()


def captions_digest(captions: dict[str, tuple[str, ...]]) -> str | None:
    """SHA-1 of a captions mapping (for shard fingerprints), None when there are no captions."""
    if not captions:
        return None
    return hashlib.sha1(json.dumps(captions, sort_keys=True).encode("utf-8")).hexdigest()

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
from pathlib import Path


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
        return {
            p.stem: _clean(p.read_text(encoding="utf-8").splitlines()) for p in sorted(path.glob("*.txt"))
        }
    if not path.is_file():
        raise ValueError(f"captions source {path} is neither a JSON file nor a folder of .txt files")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object mapping image names to captions")
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

"""Photos and textures that scikit-image ships inside its package folder, read without its downloader.

``skimage.data``'s loaders fetch some files from the network (pooch); these helpers only open files
that are already in ``skimage/data`` and fail with FileNotFoundError otherwise, so the demo builders
can never trigger a download.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image


def skimage_file(name: str) -> Path:
    """Path of a file in scikit-image's package data folder (FileNotFoundError if it is not there)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-image is not installed; it provides the demo photos")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{name} is not shipped in {path.parent}")
    return path


def skimage_photo(name: str) -> np.ndarray:
    """An RGB uint8 photo from scikit-image's package folder (grayscale ones are replicated to RGB)."""
    with Image.open(skimage_file(name)) as image:
        return np.asarray(image.convert("RGB"))


def skimage_texture(name: str) -> np.ndarray:
    """A grayscale texture from scikit-image's package folder as float32 in [0, 1]."""
    with Image.open(skimage_file(name)) as image:
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0

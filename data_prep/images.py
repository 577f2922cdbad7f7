"""Reading source images for the converters, with named skip reasons."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from src.data.schema import SampleError


def _open_array(path: str | Path, mode: str | None) -> np.ndarray:
    """Decode an image file fully (so truncated files fail here), optionally converting its mode."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode) if mode else image)
    except FileNotFoundError as exn:
        raise SampleError(f"missing_{'image' if mode else 'annotation'}", str(path)) from exn
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exn:
        raise SampleError(f"unreadable_{'image' if mode else 'annotation'}", f"{path}: {exn}") from exn


def load_rgb(path: str | Path) -> np.ndarray:
    """An image file as an RGB uint8 array, pixels as stored (no EXIF rotation).

    Raises SampleError ``missing_image`` or ``unreadable_image`` (corrupt or truncated files).
    """
    return _open_array(path, "RGB")


def load_labels(path: str | Path) -> np.ndarray:
    """A class-index PNG (mode L, P or I;16) as a 2-D array, values as stored.

    Raises SampleError ``missing_annotation``, ``unreadable_annotation`` or ``bad_annotation`` (not a
    single-channel map).
    """
    labels = _open_array(path, None)
    if labels.ndim != 2:
        raise SampleError("bad_annotation", f"{path}: shape {labels.shape}, expected one channel")
    return labels

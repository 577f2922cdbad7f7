"""Reading source images for the converters, with named skip reasons.

Every source image is checked against the training pipeline's pixel limit (``data.max_image_pixels``,
``src.data.schema.MAX_IMAGE_PIXELS`` by default) from its header, before it is decoded
(``image_too_large`` / ``annotation_too_large``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from src.data.schema import LIMITS, Limits, SampleError, check_pixels


def _open_array(path: str | Path, mode: str | None, limits: Limits = LIMITS) -> np.ndarray:
    """Decode an image file fully (so truncated files fail here), optionally converting its mode; its
    header's size is checked against ``limits.max_image_pixels`` first."""
    what = "image" if mode else "annotation"
    try:
        with Image.open(path) as image:
            try:
                check_pixels(*image.size, limits, str(path))
            except SampleError as exn:
                raise SampleError(f"{what}_too_large", str(exn).split(": ", 1)[1]) from None
            return np.asarray(image.convert(mode) if mode else image)
    except SampleError:
        raise
    except Image.DecompressionBombError as exn:  # PIL's own limit (higher than ours) stopped it first
        raise SampleError(f"{what}_too_large", f"{path}: {exn}") from exn
    except FileNotFoundError as exn:
        raise SampleError(f"missing_{'image' if mode else 'annotation'}", str(path)) from exn
    except (OSError, ValueError, SyntaxError) as exn:
        raise SampleError(f"unreadable_{'image' if mode else 'annotation'}", f"{path}: {exn}") from exn


def load_rgb(path: str | Path, limits: Limits = LIMITS) -> np.ndarray:
    """An image file as an RGB uint8 array, pixels as stored (no EXIF rotation).

    Raises SampleError ``missing_image``, ``unreadable_image`` (corrupt or truncated files) or
    ``image_too_large`` (over ``limits.max_image_pixels``, from the header).
    """
    return _open_array(path, "RGB", limits)


def load_labels(path: str | Path, limits: Limits = LIMITS) -> np.ndarray:
    """A class-index PNG (mode L, P or I;16) as a 2-D array, values as stored.

    Raises SampleError ``missing_annotation``, ``unreadable_annotation``, ``annotation_too_large`` or
    ``bad_annotation`` (not a single-channel map).
    """
    labels = _open_array(path, None, limits)
    if labels.ndim != 2:
        raise SampleError("bad_annotation", f"{path}: shape {labels.shape}, expected one channel")
    return labels

"""Offline face-folder demo: variants of the one face photo scikit-image ships (``astronaut.png``).

Crops of varied zoom around the face, mirror images, small rotations, brightness/contrast changes and
some grayscale copies, with hand-written captions in a JSON captions file, plus two photos without a
face (which the converter skips and counts as ``no_face``)::

    ROOT/faces/images/face_%03d.jpg, ROOT/faces/images/noface_%d.jpg
    ROOT/faces/captions.json
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from data_prep.assets import skimage_photo

N_FACES = 40
FACE_CENTER, FACE_SIZE = (225, 124), 100  # of the face in astronaut.png (512 x 512)
NO_FACE_PHOTOS = ("coffee.png", "rocket.jpg")
CAPTIONS = (
    "a smiling woman astronaut",
    "a portrait of a smiling woman with short brown hair",
    "a woman in a spacesuit smiling in front of a flag",
    "close-up of a smiling woman's face",
    "an astronaut's official portrait",
)


def face_variant(photo: np.ndarray, index: int) -> tuple[np.ndarray, bool]:
    """One deterministic variant of the face photo; returns (RGB image, is_grayscale)."""
    rng = np.random.default_rng(index)
    side = int(FACE_SIZE * rng.uniform(1.8, 3.6))
    cx, cy = (c + int(rng.integers(-FACE_SIZE // 5, FACE_SIZE // 5 + 1)) for c in FACE_CENTER)
    angle = float(rng.uniform(-12, 12))
    matrix = cv2.getRotationMatrix2D((float(cx), float(cy)), angle, 1.0)
    rotated = cv2.warpAffine(photo, matrix, photo.shape[1::-1], borderMode=cv2.BORDER_REFLECT)
    top, left = max(0, cy - side // 2), max(0, cx - side // 2)
    crop = rotated[top : top + side, left : left + side]
    if index % 2:
        crop = crop[:, ::-1]
    size = 96 + 8 * (index % 5)
    image = cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=cv2.INTER_AREA).astype(
        np.float32
    )
    image = np.clip((image - 128) * rng.uniform(0.8, 1.2) + 128 + rng.uniform(-20, 20), 0, 255).astype(
        np.uint8
    )
    gray = index % 5 == 4
    if gray:
        image = np.repeat(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    return image, gray


def captions_of(index: int, gray: bool) -> list[str]:
    """Three captions per variant (rotated through the list), saying when the photo is grayscale."""
    chosen = [CAPTIONS[(index + k) % len(CAPTIONS)] for k in range(3)]
    return [f"a black and white photo, {c}" for c in chosen] if gray else chosen


def write_faces_layout(base: Path) -> None:
    """Write ``base/images/*.jpg`` and ``base/captions.json``."""
    images = base / "images"
    images.mkdir(parents=True, exist_ok=True)
    photo, captions = skimage_photo("astronaut.png"), {}
    for index in range(N_FACES):
        image, gray = face_variant(photo, index)
        name = f"face_{index:03d}"
        Image.fromarray(image).save(images / f"{name}.jpg", quality=90)
        captions[name] = captions_of(index, gray)
    for index, photo_name in enumerate(NO_FACE_PHOTOS):
        other = skimage_photo(photo_name)
        small = cv2.resize(
            other, (112, round(112 * other.shape[0] / other.shape[1])), interpolation=cv2.INTER_AREA
        )
        Image.fromarray(small).save(images / f"noface_{index}.jpg", quality=90)
    (base / "captions.json").write_text(json.dumps(captions, indent=1), encoding="utf-8")

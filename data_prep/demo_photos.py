"""Real photos in the COCO 2017 layout: 8 photos scikit-image ships x 4 crops/flips + 8 drawings, with
hand-written captions (for tests and the data-pipeline benchmark, which want real JPEG photos)::

    ROOT/train2017/000000000001.jpg ...            (40 images, 96-128 px)
    ROOT/annotations/captions_train2017.json       (3 captions per image)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from data_prep.assets import skimage_photo

PHOTOS_VERSION = 1

#: photos shipped inside scikit-image's package folder (``skimage/data``), with hand-written captions.
PHOTOS: dict[str, tuple[str, ...]] = {
    "astronaut.png": (
        "a portrait of a smiling astronaut in a spacesuit",
        "an astronaut posing in front of a flag",
        "a woman in a space suit smiling at the camera",
    ),
    "chelsea.png": (
        "a tabby cat looking to the side",
        "close-up of a cat's face with long whiskers",
        "an orange and brown striped cat indoors",
    ),
    "coffee.png": (
        "a cup of coffee on a saucer",
        "a white coffee cup with a spoon",
        "a hot drink served in a cup on a table",
    ),
    "rocket.jpg": (
        "a rocket standing on a launch pad",
        "a space rocket ready for launch under a blue sky",
        "a tall rocket next to its launch tower",
    ),
    "camera.png": (
        "a black and white photo of a man with a camera",
        "a photographer looking through a camera",
        "a man standing behind a camera on a tripod",
    ),
    "motorcycle_left.png": (
        "a motorcycle parked indoors",
        "a motorbike in a cluttered room",
        "a shiny motorcycle seen from the side",
    ),
    "coins.png": (
        "old coins on a dark surface",
        "a black and white photo of many coins",
        "a collection of round coins laid out in rows",
    ),
    "hubble_deep_field.jpg": (
        "distant galaxies in deep space",
        "a telescope image of many galaxies",
        "stars and galaxies on a black sky",
    ),
}
VARIANTS = ("full", "zoom", "corner", "mirror")
N_DRAWINGS = 8
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "black": (20, 20, 20),
    "purple": (140, 60, 170),
}


# ------------------------------------------------------------------------------------- images
def variant(rgb: np.ndarray, kind: str, size: int) -> np.ndarray:
    """A crop/flip variant of a photo, resized so its shorter side is ``size``."""
    height, width = rgb.shape[:2]
    if kind == "zoom":
        rgb = rgb[height // 5 : height - height // 5, width // 5 : width - width // 5]
    elif kind == "corner":
        rgb = rgb[: height * 2 // 3, : width * 2 // 3]
    elif kind == "mirror":
        rgb = rgb[:, ::-1]
    scale = size / min(rgb.shape[:2])
    new_size = (max(size, round(rgb.shape[1] * scale)), max(size, round(rgb.shape[0] * scale)))
    return cv2.resize(np.ascontiguousarray(rgb), new_size, interpolation=cv2.INTER_AREA)


def drawing(index: int, size: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """A procedural drawing (a circle and a rectangle on a plain background) and its captions."""
    rng = np.random.default_rng(index)
    names = list(COLORS)
    shape_a, shape_b = (names[i] for i in rng.choice(len(names), 2, replace=False))
    canvas = np.full((size, size + 16 * (index % 3), 3), 245, np.uint8)
    center = (int(rng.integers(24, size - 24)), int(rng.integers(24, size - 24)))
    cv2.circle(canvas, center, int(rng.integers(10, 22)), COLORS[shape_a], -1)
    top_left = (int(rng.integers(4, size // 2)), int(rng.integers(4, size // 2)))
    cv2.rectangle(canvas, top_left, (top_left[0] + 30, top_left[1] + 24), COLORS[shape_b], 3)
    captions = (
        f"a {shape_a} circle and a {shape_b} rectangle on a white background",
        f"a simple drawing of a {shape_a} disc and a {shape_b} square outline",
        f"{shape_a} and {shape_b} shapes",
    )
    return canvas, captions


def demo_images() -> Iterator[tuple[np.ndarray, tuple[str, ...]]]:
    """The 40 demo images (32 photo variants + 8 drawings) with their captions, deterministic."""
    for p_index, (name, captions) in enumerate(PHOTOS.items()):
        photo = skimage_photo(name)
        for v_index, kind in enumerate(VARIANTS):
            size = 96 + 8 * ((p_index + v_index) % 5)
            shift = v_index % len(captions)
            yield variant(photo, kind, size), captions[shift:] + captions[:shift]
    for index in range(N_DRAWINGS):
        yield drawing(index, 96 + 8 * (index % 5))


def write_coco_layout(root: Path) -> tuple[Path, Path]:
    """Write ``root/train2017/*.jpg`` and ``root/annotations/captions_train2017.json``."""
    images_dir, annotations = root / "train2017", root / "annotations" / "captions_train2017.json"
    images_dir.mkdir(parents=True, exist_ok=True)
    annotations.parent.mkdir(parents=True, exist_ok=True)
    records, anns = [], []
    for image_id, (rgb, captions) in enumerate(demo_images(), start=1):
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(rgb).save(images_dir / file_name, quality=90)
        records.append(
            {"id": image_id, "file_name": file_name, "width": rgb.shape[1], "height": rgb.shape[0]}
        )
        anns += [{"id": len(anns) + 1, "image_id": image_id, "caption": c} for c in captions]
    data = {
        "info": {"description": "OFT-Control offline demo", "version": PHOTOS_VERSION},
        "images": records,
        "annotations": anns,
    }
    annotations.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return images_dir, annotations

"""Offline ADE20K-layout demo: procedural street scenes with exact class labels.

Each scene is drawn as an ADE20K class map first (sky, mountain, building, tree, grass, road, car),
then rendered to RGB with textures scikit-image ships (brick, grass, gravel) and gradients, so the
labels are exact. Written in the real layout and converted by ``data_prep.ade20k.convert``::

    ROOT/ADEChallengeData2016/images/{training,validation}/ADE_{train,val}_%08d.jpg
    ROOT/ADEChallengeData2016/annotations/{training,validation}/ADE_{train,val}_%08d.png
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from data_prep.assets import skimage_texture

SKY, BUILDING, TREE, GRASS, ROAD, MOUNTAIN, CAR = 3, 2, 5, 10, 7, 17, 21
N_TRAIN, N_VAL = 32, 8

#: class -> (texture file or None, base RGB colour)
LOOKS: dict[int, tuple[str | None, tuple[int, int, int]]] = {
    SKY: (None, (150, 200, 245)),
    MOUNTAIN: (None, (120, 110, 100)),
    BUILDING: ("brick.png", (190, 120, 100)),
    TREE: ("grass.png", (40, 110, 40)),
    GRASS: ("grass.png", (90, 170, 70)),
    ROAD: ("gravel.png", (120, 120, 125)),
    CAR: (None, (200, 40, 40)),
}


def scene_labels(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random street-scene class map [H, W] uint8 in ADE20K indices."""
    labels = np.full((height, width), SKY, np.uint8)
    horizon = int(height * rng.uniform(0.45, 0.65))
    peak = (int(rng.integers(0, width)), int(horizon - height * rng.uniform(0.15, 0.3)))
    mountain = np.array([(peak[0] - width // 2, horizon), peak, (peak[0] + width // 2, horizon)], np.int32)
    cv2.fillPoly(labels, [mountain], MOUNTAIN)
    for _ in range(int(rng.integers(1, 4))):
        left, bw = int(rng.integers(0, width - 12)), int(rng.integers(12, width // 3))
        labels[horizon - int(rng.integers(height // 6, horizon - 4)) : horizon, left : left + bw] = BUILDING
    labels[horizon:] = GRASS
    center, half = int(width * rng.uniform(0.35, 0.65)), int(width * rng.uniform(0.25, 0.4))
    road = np.array(
        [(center - 3, horizon), (center + 3, horizon), (center + half, height), (center - half, height)],
        np.int32,
    )
    cv2.fillPoly(labels, [road], ROAD)
    for _ in range(int(rng.integers(1, 3))):
        x, radius = int(rng.integers(0, width)), int(rng.integers(6, 14))
        cv2.circle(labels, (x, horizon - radius // 2), radius, TREE, -1)
    if rng.random() < 0.7:
        y, x = int(height * rng.uniform(0.75, 0.85)), center + int(rng.integers(-half // 2, half // 2))
        cv2.rectangle(labels, (x - 9, y - 5), (x + 9, y + 5), CAR, -1)
    return labels


_texture_file = lru_cache(maxsize=8)(skimage_texture)


def _texture(name: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random crop of a scikit-image texture, resized to [H, W], in [0, 1]."""
    texture = _texture_file(name)
    side = int(rng.integers(96, min(texture.shape) + 1))
    top, left = (int(rng.integers(0, s - side + 1)) for s in texture.shape)
    return cv2.resize(
        texture[top : top + side, left : left + side], (width, height), interpolation=cv2.INTER_AREA
    )


def render_scene(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """RGB uint8 rendering of a class map: textured, shaded colour per class."""
    height, width = labels.shape
    shade = np.linspace(1.1, 0.8, height, dtype=np.float32)[:, None, None]
    rgb = np.zeros((height, width, 3), np.float32)
    for label, (texture, colour) in LOOKS.items():
        mask = labels == label
        if not mask.any():
            continue
        base = np.asarray(colour, np.float32) * rng.uniform(0.85, 1.15, 3)
        detail = 0.6 + 0.8 * _texture(texture, rng, height, width)[..., None] if texture else shade
        rgb[mask] = np.broadcast_to(base * detail, rgb.shape)[mask]
    return np.clip(rgb + rng.normal(0, 3, rgb.shape), 0, 255).astype(np.uint8)


def write_ade20k_layout(base: Path) -> None:
    """Write the 32 training + 8 validation scenes in the ADEChallengeData2016 layout under ``base``."""
    for folder, prefix, count, offset in (
        ("training", "train", N_TRAIN, 0),
        ("validation", "val", N_VAL, 1000),
    ):
        (base / "images" / folder).mkdir(parents=True, exist_ok=True)
        (base / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        for index in range(1, count + 1):
            rng = np.random.default_rng(offset + index)
            height = 96 + 8 * (index % 5)
            labels = scene_labels(rng, height, height + 16 * (index % 3))
            name = f"ADE_{prefix}_{index:08d}"
            Image.fromarray(render_scene(labels, rng)).save(
                base / "images" / folder / f"{name}.jpg", quality=90
            )
            Image.fromarray(labels, mode="L").save(base / "annotations" / folder / f"{name}.png")

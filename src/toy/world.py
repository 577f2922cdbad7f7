"""The toy world: seeded procedural scenes of coloured shapes whose captions name them exactly.

A scene holds one or two shapes (circle, square, triangle) in one of four colours (red, green, blue,
yellow) at random positions and sizes on a plain light background. Its caption follows exactly one of
two forms::

    a <colour> <shape>
    a <colour> <shape> and a <colour> <shape>

Each scene also has an exact class map (0 background, 1 circle, 2 square, 3 triangle). Scenes are a
pure function of ``(seed, index)``, so any subset is reproducible on its own. The pretraining of the
toy backbone (``src.toy.pretrain``) draws fresh scenes on the fly; the demo datasets write them in the
COCO and ADE20K on-disk layouts for the real converters.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 40),
    "green": (40, 160, 60),
    "blue": (45, 75, 215),
    "yellow": (235, 200, 35),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: class index of each shape in the label maps (0 is the background).
SHAPE_CLASS: dict[str, int] = {shape: index for index, shape in enumerate(SHAPES, start=1)}


@dataclass(frozen=True)
class Shape:
    """One object: its colour and kind, centre and half-size as fractions of the image side."""

    colour: str
    kind: str
    cx: float
    cy: float
    size: float


@dataclass(frozen=True)
class Scene:
    """A background colour and one or two shapes, drawn in order."""

    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]

    @property
    def caption(self) -> str:
        """``a <colour> <shape>`` or ``a <colour> <shape> and a <colour> <shape>``."""
        return " and ".join(f"a {s.colour} {s.kind}" for s in self.shapes)


def parse_caption(caption: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a toy-world caption names; ValueError if it breaks the grammar."""
    pairs = []
    for part in caption.strip().split(" and "):
        words = part.split()
        if len(words) != 3 or words[0] != "a" or words[1] not in COLOURS or words[2] not in SHAPES:
            raise ValueError(f"{caption!r} is not a toy-world caption ('a <colour> <shape> [and a ...]')")
        pairs.append((words[1], words[2]))
    if len(pairs) > 2:
        raise ValueError(f"{caption!r} names {len(pairs)} objects; the toy world has one or two")
    return pairs


def _overlaps(a: Shape, b: Shape) -> bool:
    return abs(a.cx - b.cx) < a.size + b.size + 0.04 and abs(a.cy - b.cy) < a.size + b.size + 0.04


def sample_scene(rng: np.random.Generator, two_fraction: float = 0.5) -> Scene:
    """A random scene: one shape, or two that do not overlap (with probability ``two_fraction``).

    A second shape that does not fit beside the first is redrawn (bounded: every size range below leaves
    room for two shapes side by side).
    """
    background = tuple(int(v) for v in rng.integers(228, 251, 3))
    count = 2 if rng.random() < two_fraction else 1
    low, high = (0.10, 0.20) if count == 2 else (0.14, 0.32)
    shapes: list[Shape] = []
    for _ in range(1000):
        size = float(rng.uniform(low, high))
        cx, cy = (float(v) for v in rng.uniform(size + 0.02, 0.98 - size, 2))
        shape = Shape(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), cx, cy, size)
        if not any(_overlaps(shape, other) for other in shapes):
            shapes.append(shape)
        if len(shapes) == count:
            return Scene(background, tuple(shapes))
    raise RuntimeError("could not place the shapes of a toy scene")  # unreachable with the ranges above


def scene_at(seed: int, index: int, two_fraction: float = 0.5) -> Scene:
    """Scene number ``index`` of the world seeded by ``seed``: independent of every other index."""
    return sample_scene(np.random.default_rng([seed, index]), two_fraction)


def _polygon(shape: Shape, side: int) -> np.ndarray:
    """Vertices (pixels, int32) of a square or an upward triangle."""
    cx, cy, half = shape.cx * side, shape.cy * side, shape.size * side
    if shape.kind == "square":
        points = [
            (cx - half, cy - half),
            (cx + half, cy - half),
            (cx + half, cy + half),
            (cx - half, cy + half),
        ]
    else:
        points = [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    return np.round(np.array(points)).astype(np.int32)


def _draw(canvas: np.ndarray, shape: Shape, value, line_type: int) -> None:
    side = canvas.shape[0]
    if shape.kind == "circle":
        centre = (round(shape.cx * side), round(shape.cy * side))
        cv2.circle(canvas, centre, round(shape.size * side), value, -1, line_type)
    else:
        cv2.fillPoly(canvas, [_polygon(shape, side)], value, line_type)


def render(scene: Scene, resolution: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The scene as an RGB uint8 image [R, R, 3] (anti-aliased) and its class map [R, R] uint8."""
    rgb = np.empty((resolution, resolution, 3), np.uint8)
    rgb[:] = scene.background
    labels = np.zeros((resolution, resolution), np.uint8)
    for shape in scene.shapes:
        _draw(rgb, shape, COLOURS[shape.colour], cv2.LINE_AA)
        _draw(labels, shape, SHAPE_CLASS[shape.kind], cv2.LINE_8)
    return rgb, labels


def scenes(seed: int, count: int, start: int = 0, two_fraction: float = 0.5) -> Iterator[Scene]:
    """Scenes ``start .. start + count - 1`` of the world seeded by ``seed``."""
    for index in range(start, start + count):
        yield scene_at(seed, index, two_fraction)

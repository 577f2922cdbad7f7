"""A folder of face photos (CelebA-HQ or any other) -> face-landmark shards.

Reads every ``.jpg/.jpeg/.png/.webp/.bmp`` under ``--images`` (recursively; the source id is the
path relative to it, without extension). Captions come from ``--captions`` (a JSON file or a folder
of ``{stem}.txt`` files, see ``data_prep.captions``), else ``--default-caption``.

Landmarks are found with MediaPipe FaceMesh (478 points with irises) with controlnet-aux's
``MediapipeFaceDetector`` settings (``src.data.annotators.detect_faces``, which the landmark metric uses
too) and drawn with its drawing specs, so ``landmarks.png`` looks like
ControlNet's face condition. As in controlnet-aux, the image is annotated at ``--detect-resolution``
(shorter side) and faces smaller than its minimum face size (64 px there) are ignored; the drawing is
then resized to the stored image (area when shrinking, linear when enlarging). ``landmarks.json``
holds the points in pixels of the stored image: ``{"faces": [[[x, y], ...478], ...], "width",
"height"}``. Images with no face are skipped and counted (``no_face``), as are unreadable ones.

    python -m data_prep.faces --images DIR/celeba_hq --out shards/faces-landmarks --resolution 512
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from data_prep.captions import captions_digest, captions_for, load_captions
from data_prep.images import load_rgb
from data_prep.shards import SourceItem, add_writer_args, print_summary, write_dataset
from src.data import schema
from src.data.annotators import detect_faces
from src.data.transforms import resize_center_crop, resize_shorter
from src.errors import MissingInputError, run_cli

DATASET = "faces"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


@dataclass(frozen=True)
class FaceImage:
    """Payload of one face photo."""

    path: str
    captions: tuple[str, ...]


@dataclass(frozen=True)
class FaceOptions:
    """Annotation settings, stored in every sample's json and in the shards' fingerprint."""

    resolution: int | None = None
    detect_resolution: int = 512
    max_faces: int = 1
    min_confidence: float = 0.5
    default_caption: str = "a photo of a face"


def load_face_items(
    images: str | Path, texts: dict[str, tuple[str, ...]], default_caption: str
) -> list[SourceItem]:
    """One item per image file under ``images``; ``texts``: loaded captions (see data_prep.captions)."""
    images = Path(images)
    if not images.is_dir():
        raise MissingInputError(f"--images {images} is not a directory of face photos")
    items = []
    for path in sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        relative = path.relative_to(images)
        found = captions_for(texts, relative) or (default_caption,)
        items.append(SourceItem(relative.with_suffix("").as_posix(), FaceImage(str(path), found)))
    return items


def _mediapipe_face():
    """controlnet-aux's MediaPipe face module (imported on first use: importing it takes seconds)."""
    from controlnet_aux.mediapipe_face import mediapipe_face_common

    return mediapipe_face_common


def render_faces(shape: tuple[int, ...], faces: list[Any]) -> np.ndarray:
    """Draw faces as controlnet-aux's ``MediapipeFaceDetector`` does; returns RGB uint8 ``shape``."""
    style = _mediapipe_face()
    canvas = np.zeros((shape[0], shape[1], 3), np.uint8)
    for face in faces:
        style.mp_drawing.draw_landmarks(
            canvas,
            face,
            connections=style.face_connection_spec.keys(),
            landmark_drawing_spec=None,
            connection_drawing_spec=style.face_connection_spec,
        )
        style.draw_pupils(canvas, face, style.iris_landmark_spec, 2)
    return np.ascontiguousarray(canvas[:, :, ::-1])  # the specs' colours are BGR, as in controlnet-aux


def annotate_landmarks(rgb: np.ndarray, options: FaceOptions) -> tuple[np.ndarray, np.ndarray, list]:
    """Stored image, its landmark drawing and the points (pixels of the stored image) per face."""
    if options.resolution is not None:
        rgb = resize_center_crop(rgb, options.resolution)
    height, width = rgb.shape[:2]
    detect = resize_shorter(rgb, options.detect_resolution)
    faces = detect_faces(detect, options.max_faces, options.min_confidence)
    if not faces:
        raise schema.SampleError("no_face")
    drawing = render_faces(detect.shape, faces)
    shrink = detect.shape[0] > height
    drawing = cv2.resize(
        drawing, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    )
    points = [[[round(p.x * width, 2), round(p.y * height, 2)] for p in face.landmark] for face in faces]
    return rgb, drawing, points


def make_face_sample(item: SourceItem, options: FaceOptions) -> dict[str, bytes]:
    """Schema members (jpg, txt, json, landmarks.png, landmarks.json) of one face photo."""
    info: FaceImage = item.payload
    rgb, drawing, points = annotate_landmarks(load_rgb(info.path), options)
    size = {"width": rgb.shape[1], "height": rgb.shape[0]}
    meta = {
        "source": DATASET,
        "source_id": item.source_id,
        **size,
        "resolution": options.resolution,
        "captions": list(info.captions),
        "caption_index": 0,
        "faces": len(points),
        "landmarks": {
            "annotator": "mediapipe_face_mesh (controlnet-aux style)",
            "points": 478,
            "detect_resolution": options.detect_resolution,
            "max_faces": options.max_faces,
            "min_confidence": options.min_confidence,
        },
        "schema_version": schema.SCHEMA_VERSION,
    }
    return {
        schema.IMAGE: schema.encode_member(schema.IMAGE, rgb),
        schema.CAPTION: schema.encode_member(schema.CAPTION, info.captions[0]),
        schema.META: schema.encode_member(schema.META, meta),
        schema.LANDMARKS: schema.encode_member(schema.LANDMARKS, drawing),
        schema.LANDMARKS_JSON: schema.encode_member(schema.LANDMARKS_JSON, {"faces": points, **size}),
    }


def convert(
    images: str | Path,
    out: str | Path,
    *,
    captions: str | Path | None = None,
    val_fraction: float = 0.01,
    max_samples: int | None = None,
    workers: int = 1,
    shard_size: int = 1000,
    options: FaceOptions | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert a folder of face photos to landmark shards in ``out``; return the summary dict."""
    options = options or FaceOptions()
    texts = load_captions(captions)
    items = load_face_items(images, texts, options.default_caption)
    settings = {"annotator": "mediapipe_face", "captions_sha1": captions_digest(texts), **asdict(options)}
    return write_dataset(
        items,
        partial(make_face_sample, options=options),
        out,
        dataset=DATASET,
        settings=settings,
        val_fraction=val_fraction,
        shard_size=shard_size,
        max_samples=max_samples,
        workers=workers,
        overwrite=overwrite,
    )


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of the converter."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.faces",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_writer_args(parser)
    parser.add_argument("--images", required=True, help="folder of face photos (searched recursively)")
    parser.add_argument("--captions", default=None, help="JSON file or folder of {stem}.txt captions")
    parser.add_argument("--default-caption", default=FaceOptions.default_caption)
    parser.add_argument("--val-fraction", type=float, default=0.01, help="share of images for val")
    parser.add_argument("--detect-resolution", type=int, default=512, help="annotate at this shorter side")
    parser.add_argument("--max-faces", type=int, default=1)
    parser.add_argument("--min-confidence", type=float, default=0.5)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of ``python -m data_prep.faces``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    options = FaceOptions(
        args.resolution, args.detect_resolution, args.max_faces, args.min_confidence, args.default_caption
    )
    summary = convert(
        args.images,
        args.out,
        captions=args.captions,
        val_fraction=args.val_fraction,
        max_samples=args.max_samples,
        workers=args.workers,
        shard_size=args.shard_size,
        options=options,
        overwrite=args.overwrite,
    )
    print_summary(summary)
    return summary


if __name__ == "__main__":
    run_cli(main)

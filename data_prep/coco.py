"""COCO 2017 -> canny shards.

Reads COCO as downloaded: an image folder (``train2017/*.jpg``) and a captions file
(``annotations/captions_train2017.json``: ``images`` with id/file_name/width/height, ``annotations``
with image_id/caption, about five per image).

One sample per image. ``txt`` holds the image's first caption (lowest annotation id); ``json`` keeps
all of them under ``captions``, with the source id, stored width/height, source width/height and the
annotator settings. With ``--resolution R`` the image is resized (shorter side to R) and centre
cropped to R x R before annotation. The ``canny.png`` member is ``cv2.Canny`` (thresholds 100, 200,
on the grayscale image by default) of exactly the RGB array that is then JPEG-encoded into ``jpg``:
JPEG is lossy, so recomputing Canny from the *decoded* ``jpg`` gives a slightly different map; compare
against the pre-encoding array (``data_prep.images.load_rgb`` + ``resize_center_crop``) instead.

Images without captions, missing files and unreadable/corrupt images are skipped and counted by
reason (``no_captions``, ``missing_image``, ``unreadable_image``) in ``summary.json``.

    python -m data_prep.coco --images DIR/train2017 \\
        --captions DIR/annotations/captions_train2017.json --out shards/coco-canny
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.images import load_rgb
from data_prep.shards import SourceItem, add_writer_args, write_dataset
from src.data import schema
from src.data.annotators import CANNY_HIGH, CANNY_LOW, canny_edges
from src.data.transforms import resize_center_crop

DATASET = "coco2017"


@dataclass(frozen=True)
class CocoImage:
    """Payload of one COCO image."""

    path: str
    file_name: str
    width: int
    height: int
    captions: tuple[str, ...]


@dataclass(frozen=True)
class CannyOptions:
    """Annotation settings, stored in every sample's json and in the shards' fingerprint."""

    resolution: int | None = None
    canny_low: int = CANNY_LOW
    canny_high: int = CANNY_HIGH
    canny_on: str = "gray"


def load_coco_items(images_dir: str | Path, captions_file: str | Path) -> tuple[list[SourceItem], Counter]:
    """Items (one per image that has captions) and the counts of images skipped while listing."""
    data = json.loads(Path(captions_file).read_text(encoding="utf-8"))
    captions: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for ann in data["annotations"]:
        captions[ann["image_id"]].append((ann.get("id", 0), " ".join(ann["caption"].split())))
    items, skipped = [], Counter()
    for image in data["images"]:
        texts = tuple(text for _, text in sorted(captions.get(image["id"], [])) if text)
        if not texts:
            skipped["no_captions"] += 1
            continue
        payload = CocoImage(
            str(Path(images_dir) / image["file_name"]),
            image["file_name"],
            int(image["width"]),
            int(image["height"]),
            texts,
        )
        items.append(SourceItem(str(image["id"]), payload))
    return items, skipped


def annotate_canny(rgb: np.ndarray, options: CannyOptions) -> tuple[np.ndarray, np.ndarray]:
    """The stored RGB array (resized/cropped if asked) and its canny map."""
    if options.resolution is not None:
        rgb = resize_center_crop(rgb, options.resolution)
    edges = canny_edges(rgb, options.canny_low, options.canny_high, on=options.canny_on)
    return rgb, edges


def make_coco_sample(item: SourceItem, options: CannyOptions) -> dict[str, bytes]:
    """Schema members (jpg, txt, json, canny.png) of one COCO image."""
    info: CocoImage = item.payload
    rgb, edges = annotate_canny(load_rgb(info.path), options)
    schema.check_same_size(rgb, {schema.CANNY: edges})
    meta = {
        "source": DATASET,
        "source_id": item.source_id,
        "file_name": info.file_name,
        "width": rgb.shape[1],
        "height": rgb.shape[0],
        "source_width": info.width,
        "source_height": info.height,
        "captions": list(info.captions),
        "caption_index": 0,
        "canny": {"low": options.canny_low, "high": options.canny_high, "on": options.canny_on},
        "resolution": options.resolution,
        "schema_version": schema.SCHEMA_VERSION,
    }
    return {
        schema.IMAGE: schema.encode_member(schema.IMAGE, rgb),
        schema.CAPTION: schema.encode_member(schema.CAPTION, info.captions[0]),
        schema.META: schema.encode_member(schema.META, meta),
        schema.CANNY: schema.encode_member(schema.CANNY, edges),
    }


def convert(
    images: str | Path,
    captions: str | Path,
    out: str | Path,
    *,
    val_fraction: float = 0.01,
    max_samples: int | None = None,
    workers: int = 1,
    shard_size: int = 1000,
    options: CannyOptions | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert COCO images + captions to canny shards in ``out``; return the summary dict."""
    options = options or CannyOptions()
    if not Path(images).is_dir():
        raise ValueError(f"--images {images} is not a directory (expected COCO's train2017/)")
    items, pre_skipped = load_coco_items(images, captions)
    return write_dataset(
        items,
        partial(make_coco_sample, options=options),
        out,
        dataset=DATASET,
        settings={"annotator": "canny", **asdict(options)},
        val_fraction=val_fraction,
        shard_size=shard_size,
        max_samples=max_samples,
        workers=workers,
        pre_skipped=pre_skipped,
        overwrite=overwrite,
    )


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of the converter."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.coco",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_writer_args(parser)
    parser.add_argument("--images", required=True, help="COCO image folder, e.g. DIR/train2017")
    parser.add_argument("--captions", required=True, help="e.g. DIR/annotations/captions_train2017.json")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="share of images for val")
    parser.add_argument("--canny-low", type=int, default=CANNY_LOW)
    parser.add_argument("--canny-high", type=int, default=CANNY_HIGH)
    parser.add_argument(
        "--canny-on",
        choices=("gray", "rgb"),
        default="gray",
        help="run Canny on the grayscale image (default) or the RGB image (ControlNet)",
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of ``python -m data_prep.coco``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    options = CannyOptions(args.resolution, args.canny_low, args.canny_high, args.canny_on)
    summary = convert(
        args.images,
        args.captions,
        args.out,
        val_fraction=args.val_fraction,
        max_samples=args.max_samples,
        workers=args.workers,
        shard_size=args.shard_size,
        options=options,
        overwrite=args.overwrite,
    )
    print(json.dumps({k: summary[k] for k in ("written", "splits", "skipped", "seconds")}, indent=1))
    return summary


if __name__ == "__main__":
    main()

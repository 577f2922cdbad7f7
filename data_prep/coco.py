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
reason (``no_captions``, ``missing_image``, ``unreadable_image``, ``image_too_large``) in
``summary.json``; so are entries whose ``file_name`` leaves ``--images`` (absolute, or with ``..``:
``unsafe_path``), which are never opened. A captions file that is not COCO's JSON is one error line
naming the file and what is wrong.

    python -m data_prep.coco --images DIR/train2017 \\
        --captions DIR/annotations/captions_train2017.json --out shards/coco-canny
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.captions import inside, read_json
from data_prep.images import load_rgb
from data_prep.shards import SourceItem, add_canny_args, add_writer_args, print_summary, write_dataset
from src.data import schema
from src.data.annotators import CANNY_HIGH, CANNY_LOW, canny_edges
from src.data.transforms import resize_center_crop
from src.errors import InputError, MissingInputError, run_cli

log = logging.getLogger(__name__)

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


def _coco_captions(data: Any, path: Path) -> dict[Any, list[tuple[int, str]]]:
    """``image_id -> [(annotation id, caption)]`` of COCO's captions JSON; InputError naming what is wrong."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InputError(
            f"--captions {path} is not a COCO captions file: expected an object with an 'images' list"
        )
    if not isinstance(data.get("annotations"), list):
        raise InputError(f"--captions {path} is not a COCO captions file: expected an 'annotations' list")
    captions: dict[Any, list[tuple[int, str]]] = defaultdict(list)
    for index, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str) or "image_id" not in ann:
            raise InputError(
                f"--captions {path}: annotations[{index}] needs an 'image_id' and a text 'caption'"
            )
        if not isinstance(ann["image_id"], int | str):
            raise InputError(f"--captions {path}: annotations[{index}].image_id must be a number or a string")
        order = ann.get("id", 0)
        captions[ann["image_id"]].append(
            (order if isinstance(order, int) else 0, " ".join(ann["caption"].split()))
        )
    return captions


def load_coco_items(images_dir: str | Path, captions_file: str | Path) -> tuple[list[SourceItem], Counter]:
    """Items (one per image that has captions) and the counts of images skipped while listing.

    A ``file_name`` that is absolute or climbs out of ``images_dir`` is counted as ``unsafe_path`` and
    never opened; a malformed captions file raises ``InputError`` naming the file and the entry.
    """
    path = Path(captions_file)
    data = read_json(path, "--captions")
    captions = _coco_captions(data, path)
    items, skipped = [], Counter()
    for index, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise InputError(f"--captions {path}: images[{index}] needs an 'id' and a 'file_name'")
        if not isinstance(image["id"], int | str):
            raise InputError(f"--captions {path}: images[{index}].id must be a number or a string")
        texts = tuple(text for _, text in sorted(captions.get(image["id"], [])) if text)
        if not texts:
            skipped["no_captions"] += 1
            continue
        source = inside(images_dir, image["file_name"])
        if source is None:
            skipped["unsafe_path"] += 1
            log.warning("skipped image %s: file_name %r is outside --images", image["id"], image["file_name"])
            continue
        try:
            width, height = int(image.get("width", 0)), int(image.get("height", 0))
        except (TypeError, ValueError):
            raise InputError(
                f"--captions {path}: images[{index}] has a width/height that is not a number"
            ) from None
        payload = CocoImage(str(source), image["file_name"], width, height, texts)
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
        raise MissingInputError(f"--images {images} is not a directory (expected COCO's train2017/)")
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
    add_canny_args(parser)
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
    print_summary(summary)
    return summary


if __name__ == "__main__":
    run_cli(main)

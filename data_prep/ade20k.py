"""ADE20K (SceneParsing, ``ADEChallengeData2016``) -> segmentation shards.

Reads the dataset as downloaded::

    ROOT/images/{training,validation}/ADE_*.jpg
    ROOT/annotations/{training,validation}/ADE_*.png     (class indices 0..150, 0 = other)

One sample per image: ``jpg``, ``txt``, ``json``, ``seg.png`` (the class map coloured with the
ADE20K palette, as ControlNet's segmentation condition; label 0 is black) and ``seglabel.png`` (the
class indices, for evaluation). ``training`` goes to the ``train`` split, ``validation`` to ``val``.
With ``--resolution R`` image and labels are resized (shorter side to R; labels nearest-neighbour)
and centre cropped before the colour map is made, so ``seg.png == palette[seglabel.png]`` exactly.
With ``--canny`` every sample also gets ``canny.png``: the COCO converter's edge map (``cv2.Canny``,
thresholds 100, 200 on the grayscale image unless ``--canny-low/--canny-high/--canny-on`` say otherwise,
``src.data.annotators.canny_edges``) of the stored RGB array before JPEG encoding, so one sample serves
the ``canny``, ``seg`` and ``canny+seg`` tasks.

Captions come from ``--captions`` (a JSON file or a folder of ``{stem}.txt``, see
``data_prep.captions``) when it has the image, else from the classes present, largest first
("a photo of sky, building and road"); ``json.caption_source`` says which. Missing or unreadable
images/annotations and size mismatches are skipped and counted by reason.

    python -m data_prep.ade20k --root DIR/ADEChallengeData2016 --out shards/ade20k-seg --resolution 512
    python -m data_prep.ade20k --root DIR/ADEChallengeData2016 --out shards/ade20k-canny-seg --canny
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.captions import captions_digest, captions_for, load_captions
from data_prep.images import load_labels, load_rgb
from data_prep.shards import SourceItem, add_canny_args, add_writer_args, print_summary, write_dataset
from src.data import palette, schema
from src.data.annotators import CANNY_HIGH, CANNY_LOW, canny_edges
from src.data.transforms import resize_center_crop
from src.errors import ConfigError, MissingInputError, run_cli

DATASET = "ade20k"
FOLDERS = {"training": "train", "validation": "val"}


@dataclass(frozen=True)
class AdeImage:
    """Payload of one ADE20K image."""

    image: str
    annotation: str
    folder: str
    captions: tuple[str, ...]


@dataclass(frozen=True)
class SegOptions:
    """Conversion settings, stored in the shards' fingerprint.

    ``canny``: also write ``canny.png`` (``canny_edges`` of the stored image with ``canny_low``,
    ``canny_high`` and ``canny_on``, the COCO converter's defaults); without it the canny settings stay
    out of the fingerprint, so segmentation-only shards are the same as before the option existed.
    """

    resolution: int | None = None
    max_caption_classes: int = 6
    canny: bool = False
    canny_low: int = CANNY_LOW
    canny_high: int = CANNY_HIGH
    canny_on: str = "gray"

    def settings(self) -> dict[str, Any]:
        """The settings that make the shards: the canny ones only with ``canny``."""
        settings = asdict(self)
        if not self.canny:
            for name in ("canny", "canny_low", "canny_high", "canny_on"):
                del settings[name]
        return settings


def load_ade20k_items(
    root: str | Path, texts: dict[str, tuple[str, ...]], folders: tuple[str, ...] = tuple(FOLDERS)
) -> list[SourceItem]:
    """One item per image in ``ROOT/images/{folder}``, pinned to its split; ``texts``: loaded captions."""
    root = Path(root)
    items = []
    for folder in folders:
        if folder not in FOLDERS:
            raise ConfigError(f"unknown ADE20K folder {folder!r}; expected some of {list(FOLDERS)}")
        images_dir = root / "images" / folder
        if not images_dir.is_dir():
            raise MissingInputError(
                f"{images_dir} is not a directory (expected ADEChallengeData2016/images/{folder})"
            )
        for path in sorted(images_dir.rglob("*.jpg")):
            relative = path.relative_to(images_dir)
            annotation = root / "annotations" / folder / relative.with_suffix(".png")
            payload = AdeImage(str(path), str(annotation), folder, captions_for(texts, relative))
            items.append(SourceItem(relative.with_suffix("").as_posix(), payload, split=FOLDERS[folder]))
    return items


def annotate_seg(rgb: np.ndarray, labels: np.ndarray, options: SegOptions) -> tuple[np.ndarray, ...]:
    """Stored image, class indices (uint8) and colour map, resized/cropped together if asked."""
    if labels.shape != rgb.shape[:2]:
        raise schema.SampleError("size_mismatch", f"image {rgb.shape[:2]} vs annotation {labels.shape}")
    if labels.size and int(labels.max()) > palette.N_CLASSES:
        raise schema.SampleError("label_out_of_range", f"max label {int(labels.max())}")
    labels = labels.astype(np.uint8)
    if options.resolution is not None:
        rgb = resize_center_crop(rgb, options.resolution)
        labels = resize_center_crop(labels, options.resolution, "nearest")
    return rgb, labels, palette.colorize(labels)


def make_seg_sample(item: SourceItem, options: SegOptions) -> dict[str, bytes]:
    """Schema members (jpg, txt, json, seg.png, seglabel.png, with ``options.canny`` canny.png) of one
    ADE20K image."""
    info: AdeImage = item.payload
    rgb, labels, seg = annotate_seg(load_rgb(info.image), load_labels(info.annotation), options)
    captions = info.captions or (palette.classes_caption(labels, options.max_caption_classes),)
    meta = {
        "source": DATASET,
        "source_id": item.source_id,
        "folder": info.folder,
        "width": rgb.shape[1],
        "height": rgb.shape[0],
        "resolution": options.resolution,
        "captions": list(captions),
        "caption_index": 0,
        "caption_source": "file" if info.captions else "classes",
        "classes": [int(k) for k in np.unique(labels) if k > 0],
        "palette": "ade20k (controlnet-aux ade_palette), label k -> palette[k-1], 0 -> black",
        "schema_version": schema.SCHEMA_VERSION,
    }
    members = {
        schema.SEG: schema.encode_member(schema.SEG, seg),
        schema.SEGLABEL: schema.encode_member(schema.SEGLABEL, labels),
    }
    if options.canny:
        edges = canny_edges(rgb, options.canny_low, options.canny_high, on=options.canny_on)
        schema.check_same_size(rgb, {schema.CANNY: edges})
        meta["canny"] = {"low": options.canny_low, "high": options.canny_high, "on": options.canny_on}
        members = {schema.CANNY: schema.encode_member(schema.CANNY, edges), **members}
    return {
        schema.IMAGE: schema.encode_member(schema.IMAGE, rgb),
        schema.CAPTION: schema.encode_member(schema.CAPTION, captions[0]),
        schema.META: schema.encode_member(schema.META, meta),
        **members,
    }


def convert(
    root: str | Path,
    out: str | Path,
    *,
    captions: str | Path | None = None,
    folders: tuple[str, ...] = tuple(FOLDERS),
    max_samples: int | None = None,
    workers: int = 1,
    shard_size: int = 1000,
    options: SegOptions | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert ADE20K to segmentation shards (with ``options.canny`` also canny) in ``out``; return the
    summary dict."""
    options = options or SegOptions()
    texts = load_captions(captions)
    items = load_ade20k_items(root, texts, folders)
    settings = {"annotator": "ade20k_palette", "captions_sha1": captions_digest(texts), **options.settings()}
    return write_dataset(
        items,
        partial(make_seg_sample, options=options),
        out,
        dataset=DATASET,
        settings=settings,
        val_fraction=0.0,
        shard_size=shard_size,
        max_samples=max_samples,
        workers=workers,
        overwrite=overwrite,
    )


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of the converter."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.ade20k",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_writer_args(parser)
    parser.add_argument("--root", required=True, help="the ADEChallengeData2016 folder")
    parser.add_argument("--captions", default=None, help="JSON file or folder of {stem}.txt captions")
    parser.add_argument("--folders", default="training,validation", help="comma-separated folders")
    parser.add_argument(
        "--canny", action="store_true", help="also write canny.png (for the canny and canny+seg tasks)"
    )
    add_canny_args(parser)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of ``python -m data_prep.ade20k``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    summary = convert(
        args.root,
        args.out,
        captions=args.captions,
        folders=tuple(args.folders.split(",")),
        max_samples=args.max_samples,
        workers=args.workers,
        shard_size=args.shard_size,
        options=SegOptions(
            resolution=args.resolution,
            canny=args.canny,
            canny_low=args.canny_low,
            canny_high=args.canny_high,
            canny_on=args.canny_on,
        ),
        overwrite=args.overwrite,
    )
    print_summary(summary)
    return summary


if __name__ == "__main__":
    run_cli(main)

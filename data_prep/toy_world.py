"""The toy world (``src.toy.world``) written in the real on-disk layouts, for the real converters::

ROOT/coco/train2017/*.png + ROOT/coco/annotations/captions_train2017.json   -> data_prep.coco
ROOT/ADEChallengeData2016/{images,annotations}/{training,validation}/*      -> data_prep.ade20k

python -m data_prep.toy_world --root DIR --count 512 --resolution 64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from src.errors import run_cli
from src.toy.world import render, scenes


def write_coco_layout(root: Path, count: int, seed: int = 0, resolution: int = 64) -> tuple[Path, Path]:
    """COCO 2017 layout: ``root/train2017/*.png`` and ``root/annotations/captions_train2017.json``.

    Images are PNG (the converter reads any format by ``file_name``) so flat colours keep sharp edges.
    """
    images_dir, annotations = root / "train2017", root / "annotations" / "captions_train2017.json"
    images_dir.mkdir(parents=True, exist_ok=True)
    annotations.parent.mkdir(parents=True, exist_ok=True)
    records, anns = [], []
    for image_id, scene in enumerate(tqdm(scenes(seed, count), total=count, desc="toy coco"), start=1):
        file_name = f"{image_id:012d}.png"
        Image.fromarray(render(scene, resolution)[0]).save(images_dir / file_name)
        records.append({"id": image_id, "file_name": file_name, "width": resolution, "height": resolution})
        anns.append({"id": image_id, "image_id": image_id, "caption": scene.caption})
    data = {
        "info": {"description": "OFT-Control toy world", "seed": seed},
        "images": records,
        "annotations": anns,
    }
    annotations.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return images_dir, annotations


def write_ade20k_layout(root: Path, count: int, val_count: int, seed: int = 0, resolution: int = 64) -> Path:
    """ADEChallengeData2016 layout with shape classes, plus ``root/captions.json`` (stem -> caption)."""
    captions: dict[str, str] = {}
    splits = (("training", "train", count, 0), ("validation", "val", val_count, count))
    for folder, prefix, n, start in splits:
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        for offset, scene in enumerate(tqdm(scenes(seed, n, start), total=n, desc=f"toy ade20k {folder}")):
            name = f"ADE_{prefix}_{offset + 1:08d}"
            rgb, labels = render(scene, resolution)
            Image.fromarray(rgb).save(root / "images" / folder / f"{name}.jpg", quality=95)
            Image.fromarray(labels, mode="L").save(root / "annotations" / folder / f"{name}.png")
            captions[name] = scene.caption
    path = root / "captions.json"
    path.write_text(json.dumps(captions, indent=1), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m data_prep.toy_world``: write both layouts under ``--root``."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.toy_world",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--root", required=True, help="folder for the coco/ and ADEChallengeData2016/ layouts"
    )
    parser.add_argument("--count", type=int, default=512, help="scenes per layout (training)")
    parser.add_argument("--val-count", type=int, default=64, help="validation scenes of the ADE20K layout")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args(argv)
    root = Path(args.root)
    write_coco_layout(root / "coco", args.count + args.val_count, args.seed, args.resolution)
    write_ade20k_layout(root / "ADEChallengeData2016", args.count, args.val_count, args.seed, args.resolution)
    print(root)


if __name__ == "__main__":
    run_cli(main)

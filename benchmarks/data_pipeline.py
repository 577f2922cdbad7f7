"""Training data throughput per worker at 512 px beside raw decoding, and the converters' image rates.

    python -m benchmarks.data_pipeline [--repeats 10] [--quick] [--no-write] [--threads N] [--cache DIR]

Source layouts are made once in a cache folder (default ``$OFT_CONTROL_CACHE/bench/data_pipeline``) from
the photos and textures scikit-image ships, upscaled so that every image is larger than 512 px: a COCO
layout (64 crops of the demo photos, shorter side 512-608, with the demo captions), an ADE20K layout
(32 procedural street scenes from ``data_prep.demo_seg``) and a face folder (16 crops around the face in
``astronaut.png``). The COCO layout is converted once with ``data_prep.coco`` at ``--resolution 512`` into
the shards that the throughput runs read.

Throughput, in samples per second of one process (``num_workers=0``, i.e. what one DataLoader worker
does; torch runs with one thread by default, as in a DataLoader worker):

- ``raw PIL`` / ``raw OpenCV``: read the tar members with ``tarfile`` and decode the jpg and the
  canny png to uint8 arrays (and the caption to str), no transform, nothing else;
- ``ours``: the ``ShardDataModule`` train loader over the same shards: the shard reader (tar reading,
  member filter and header checks), shuffle buffer, decode, paired resize/crop/flip straight into uint8
  batches of 4, i.e. what crosses a DataLoader worker's boundary;
- ``ours with per-sample decode + collate``: the same stream batched as before ``DecodeBatches``
  (every sample decoded and mirrored on its own, then stacked): what the one-copy batching saves;
- ``ours + float conversion on the CPU``: the same batches, then ``to_model_inputs`` (uint8 -> the
  model's float32 inputs) in the same process. In training that conversion runs after the transfer,
  on the accelerator (``ShardDataModule.on_after_batch_transfer``); this row shows its CPU cost.

The variants run interleaved (A, B, C, A, B, C, ...) so load from other jobs hits all alike; the
tables show medians and the median of the per-round ratios. A second table splits our per-sample time
into stages measured with the pipeline's own functions on in-memory samples. Converters run (also
interleaved, one worker process each) into fresh temporary folders; images per second counts every
source image, skipped ones included. The tables are rewritten in benchmarks/README.md between the
``data_pipeline`` markers.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import shutil
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import PIL
import torch
import webdataset as wds
from PIL import Image

from benchmarks import readme
from benchmarks.readme import machine, write_section
from data_prep import ade20k, coco, faces
from data_prep.assets import skimage_photo
from data_prep.demo_faces import FACE_CENTER, FACE_SIZE
from data_prep.demo_photos import PHOTOS
from data_prep.demo_seg import render_scene, scene_labels
from src.data import schema
from src.data.datamodule import ShardDataModule
from src.data.health import SkipCounter
from src.data.pipeline import BufferShuffle, DecodeBatches, SampleDecoder, collate, to_model_inputs
from src.data.reader import ShardReader

README = readme.README
START, END = "<!-- data_pipeline:start -->", "<!-- data_pipeline:end -->"
RES = 512
BATCH = 4
SHARD_SIZE = 16
LAYOUT_VERSION = 1
DEFAULT_CACHE = Path(os.environ.get("OFT_CONTROL_CACHE", "~/.cache/oft-control")) / "bench" / "data_pipeline"


@dataclass(frozen=True)
class Sizes:
    """Number of source images per layout."""

    coco: int
    ade20k: int
    faces: int


FULL, QUICK = Sizes(coco=64, ade20k=32, faces=16), Sizes(coco=16, ade20k=8, faces=4)


# ------------------------------------------------------------------------------- source layouts
def upscaled_crop(
    photo: np.ndarray, rng: np.random.Generator, box: tuple[int, int, int, int] | None = None
) -> np.ndarray:
    """A crop of ``photo`` (``box`` = top, left, height, width, or a random 60-100 % window), mirrored
    half the time, resized (cubic) to a shorter side of 512-608 px and an aspect ratio of 1-1.4."""
    height, width = photo.shape[:2]
    if box is None:
        crop_h, crop_w = int(height * rng.uniform(0.6, 1.0)), int(width * rng.uniform(0.6, 1.0))
        box = (
            int(rng.integers(0, height - crop_h + 1)),
            int(rng.integers(0, width - crop_w + 1)),
            crop_h,
            crop_w,
        )
    top, left, crop_h, crop_w = box
    crop = photo[top : top + crop_h, left : left + crop_w]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    short = int(rng.integers(RES, RES + 97))
    long = round(short * rng.uniform(1.0, 1.4))
    size = (long, short) if crop_w >= crop_h else (short, long)
    return cv2.resize(np.ascontiguousarray(crop), size, interpolation=cv2.INTER_CUBIC)


def write_coco(root: Path, count: int) -> None:
    """``root/train2017/*.jpg`` and ``root/annotations/captions_train2017.json`` (COCO 2017 layout)."""
    rng, names = np.random.default_rng(0), list(PHOTOS)
    photos = {name: skimage_photo(name) for name in names}
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    records, anns = [], []
    for image_id in range(1, count + 1):
        name = names[image_id % len(names)]
        rgb = upscaled_crop(photos[name], rng)
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(rgb).save(root / "train2017" / file_name, quality=90)
        records.append(
            {"id": image_id, "file_name": file_name, "width": rgb.shape[1], "height": rgb.shape[0]}
        )
        anns += [{"id": len(anns) + 1, "image_id": image_id, "caption": c} for c in PHOTOS[name]]
    data = {"images": records, "annotations": anns}
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps(data), encoding="utf-8")


def write_ade20k(root: Path, count: int) -> None:
    """``root/images/training/*.jpg`` + ``root/annotations/training/*.png`` (ADEChallengeData2016 layout)."""
    for sub in ("images", "annotations"):
        (root / sub / "training").mkdir(parents=True)
    for index in range(1, count + 1):
        rng = np.random.default_rng(index)
        height = int(rng.integers(RES, RES + 97))
        labels = scene_labels(rng, height, round(height * rng.uniform(1.0, 1.4)))
        name = f"ADE_train_{index:08d}"
        Image.fromarray(render_scene(labels, rng)).save(
            root / "images" / "training" / f"{name}.jpg", quality=90
        )
        Image.fromarray(labels, mode="L").save(root / "annotations" / "training" / f"{name}.png")


def write_faces(root: Path, count: int) -> None:
    """``root/images/*.jpg``: crops of 2.5-4.5 face sizes around the face in ``astronaut.png``."""
    photo, rng = skimage_photo("astronaut.png"), np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    for index in range(count):
        side = int(FACE_SIZE * rng.uniform(2.5, 4.5))
        cx, cy = FACE_CENTER
        top, left = max(0, cy - side // 2), max(0, cx - side // 2)
        box = (top, left, min(side, photo.shape[0] - top), min(side, photo.shape[1] - left))
        Image.fromarray(upscaled_crop(photo, rng, box)).save(
            root / "images" / f"face_{index:03d}.jpg", quality=90
        )


def ensure(folder: Path, write: Callable[[Path, int], None], count: int) -> Path:
    """``folder`` with a complete layout of ``count`` images, written unless a marker says it is there."""
    marker, stamp = folder / ".bench-layout", f"{LAYOUT_VERSION}:{count}"
    if marker.exists() and marker.read_text(encoding="utf-8") == stamp:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    write(folder, count)
    marker.write_text(stamp, encoding="utf-8")
    return folder


# ----------------------------------------------------------------------------------- converters
def convert_coco(source: Path, out: Path) -> dict:
    """The COCO converter at 512 px (canny, thresholds 100/200), one worker, no val split."""
    return coco.convert(
        source / "train2017",
        source / "annotations" / "captions_train2017.json",
        out,
        val_fraction=0.0,
        shard_size=SHARD_SIZE,
        options=coco.CannyOptions(resolution=RES),
        overwrite=True,
    )


def convert_ade20k(source: Path, out: Path) -> dict:
    """The ADE20K converter at 512 px (palette colour map + label png), one worker."""
    return ade20k.convert(
        source,
        out,
        folders=("training",),
        shard_size=SHARD_SIZE,
        options=ade20k.SegOptions(resolution=RES),
        overwrite=True,
    )


def convert_faces(source: Path, out: Path) -> dict:
    """The face converter at 512 px (MediaPipe face mesh at 512 px, landmark rendering), one worker."""
    return faces.convert(
        source / "images",
        out,
        val_fraction=0.0,
        shard_size=SHARD_SIZE,
        options=faces.FaceOptions(resolution=RES),
        overwrite=True,
    )


CONVERTERS: dict[str, tuple[str, Callable[[Path, int], None], Callable[[Path, Path], dict]]] = {
    "COCO -> canny": ("coco", write_coco, convert_coco),
    "ADE20K -> seg": ("ade20k", write_ade20k, convert_ade20k),
    "faces -> landmarks": ("faces", write_faces, convert_faces),
}


def time_converters(cache: Path, sizes: Sizes, repeats: int, warmup: int) -> list[dict]:
    """Interleaved converter runs into fresh temporary folders; one row per converter."""
    sources = {
        name: ensure(cache / f"{folder}-{getattr(sizes, folder)}", write, getattr(sizes, folder))
        for name, (folder, write, _) in CONVERTERS.items()
    }
    rates: dict[str, list[float]] = {name: [] for name in CONVERTERS}
    summaries: dict[str, dict] = {}
    for round_ in range(warmup + repeats):
        for name, (_, _, run) in CONVERTERS.items():
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                start = time.perf_counter()
                summary = run(sources[name], Path(tmp) / "out")
                elapsed = time.perf_counter() - start
            summaries[name] = summary
            if round_ >= warmup:
                rates[name].append((summary["written"] + summary["skipped_total"]) / elapsed)
    return [
        {
            "name": name,
            "images": summaries[name]["written"] + summaries[name]["skipped_total"],
            "written": summaries[name]["written"],
            "skipped": summaries[name]["skipped"],
            "rate": statistics.median(rates[name]),
        }
        for name in CONVERTERS
    ]


# ----------------------------------------------------------------------------------- throughput
def tar_samples(urls: list[str]) -> Iterator[dict[str, bytes]]:
    """Samples (member name -> bytes) of the shards, read with ``tarfile`` alone, in order."""
    for url in urls:
        with tarfile.open(url, "r|") as tar:
            key, sample = None, {}
            for info in tar:
                name, _, member = info.name.partition(".")
                if name != key and sample:
                    yield sample
                    sample = {}
                key, sample[member] = name, tar.extractfile(info).read()
            if sample:
                yield sample


def raw_opencv(urls: list[str]) -> int:
    """Read and decode jpg + canny png (cv2.imdecode) and the caption; return the samples done."""
    count = 0
    for sample in tar_samples(urls):
        cv2.imdecode(np.frombuffer(sample[schema.IMAGE], np.uint8), cv2.IMREAD_COLOR)
        cv2.imdecode(np.frombuffer(sample[schema.CANNY], np.uint8), cv2.IMREAD_GRAYSCALE)
        sample[schema.CAPTION].decode("utf-8")
        count += 1
    return count


def raw_pil(urls: list[str]) -> int:
    """Read and decode jpg + canny png (PIL to numpy) and the caption; return the samples done."""
    count = 0
    for sample in tar_samples(urls):
        for member in (schema.IMAGE, schema.CANNY):
            with Image.open(io.BytesIO(sample[member])) as image:
                np.asarray(image)
        sample[schema.CAPTION].decode("utf-8")
        count += 1
    return count


OURS, OURS_FLOAT = "ours: ShardDataModule train loader (uint8 batches)", "ours + float conversion on the CPU"
PER_SAMPLE = "ours with per-sample decode + collate (the batching before `DecodeBatches`)"


def ours(urls: list[str], convert: bool = False) -> Callable[[], int]:
    """One pass over the ``ShardDataModule`` train loader (built once, as Lightning does); with ``convert``
    every batch also goes through ``to_model_inputs`` here, on the CPU."""
    dm = ShardDataModule(
        urls, condition="canny", resolution=RES, batch_size=BATCH, num_workers=0, shuffle_buffer=1000, seed=0
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    if convert:
        return lambda: sum(len(to_model_inputs(batch)["key"]) for batch in loader)
    return lambda: sum(len(batch["key"]) for batch in loader)


def per_sample(urls: list[str]) -> Callable[[], int]:
    """The train loader's stream with the batching it had before ``DecodeBatches``: each sample decoded
    on its own (``SampleDecoder``: a mirrored one copied by the flip), then stacked by ``collate``."""
    skips = SkipCounter("bench")
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_node,
        wds.split_by_worker,
        BufferShuffle(len(urls), 0),
        ShardReader(skips),
        BufferShuffle(1000, 0),
        wds.map(SampleDecoder("canny", RES, True, True, seed=0), handler=skips),
        wds.batched(BATCH, collation_fn=collate, partial=False),
        skips.attach,
    )
    loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=0)
    return lambda: sum(len(batch["key"]) for batch in loader)


def stages(urls: list[str]) -> dict[str, Callable[[], int]]:
    """Our per-sample stages, each over all samples held in memory (see the module docstring)."""
    raw = list(wds.DataPipeline(wds.SimpleShardList(urls), ShardReader(SkipCounter("bench"))))
    batcher = DecodeBatches(
        SampleDecoder("canny", RES, True, True, seed=0), BATCH, False, SkipCounter("bench")
    )
    batched = list(batcher(raw))

    def read() -> int:
        return sum(1 for _ in wds.DataPipeline(wds.SimpleShardList(urls), ShardReader(SkipCounter("bench"))))

    def decode() -> int:
        for s in raw:
            for member in (schema.IMAGE, schema.CANNY, schema.CAPTION):
                schema.decode_member(member, s[member])
        return len(raw)

    def batches() -> int:
        return sum(len(batch["key"]) for batch in batcher(raw))

    def convert() -> int:
        return sum(len(to_model_inputs(batch)["key"]) for batch in batched)

    return {
        "tar read (ShardReader: grouping + header checks)": read,
        "decode jpg + canny png + caption": decode,
        f"DecodeBatches (decode, crop, one copy into batches of {BATCH}, mirror in that copy)": batches,
        "to_model_inputs on the CPU (on the accelerator in training)": convert,
    }


def interleave(runs: dict[str, Callable[[], int]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Samples per second of every run in every timed round, the runs interleaved."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(warmup + repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            count = run()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                rates[name].append(count / elapsed)
    return rates


# ---------------------------------------------------------------------------------------- report
def ratio(rates: dict[str, list[float]], name: str, ref: str) -> float:
    """Median over rounds of rate(name) / rate(ref)."""
    return statistics.median(a / b for a, b in zip(rates[name], rates[ref], strict=True))


def throughput_table(rates: dict[str, list[float]]) -> str:
    lines = [
        "| variant | median samples/s | ms/sample | vs raw OpenCV | vs raw PIL |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in rates:
        rate = statistics.median(rates[name])
        lines.append(
            f"| {name} | {rate:.1f} | {1e3 / rate:.2f} | {ratio(rates, name, 'raw OpenCV'):.2f}x "
            f"| {ratio(rates, name, 'raw PIL'):.2f}x |"
        )
    return "\n".join(lines)


def stages_table(rates: dict[str, list[float]]) -> str:
    lines = ["| stage (ours) | median ms/sample |", "|---|---:|"]
    lines += [f"| {name} | {1e3 / statistics.median(r):.2f} |" for name, r in rates.items()]
    return "\n".join(lines)


def converters_table(rows: list[dict]) -> str:
    lines = [
        "| converter (1 worker, 512 px) | source images | median images/s | written | skipped |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        skipped = ", ".join(f"{k} {v}" for k, v in r["skipped"].items()) or "none"
        lines.append(f"| {r['name']} | {r['images']} | {r['rate']:.1f} | {r['written']} | {skipped} |")
    return "\n".join(lines)


def reading(rates: dict[str, list[float]]) -> str:
    """The target check and what the throughput table shows (the causes are measured in the stages)."""
    share, with_float = ratio(rates, OURS, "raw OpenCV"), ratio(rates, OURS_FLOAT, "raw OpenCV")
    before = ratio(rates, PER_SAMPLE, "raw OpenCV")
    verdict = "met" if share >= 0.8 else "**not met**"
    return (
        f"Target: ours at least 80% of the raw OpenCV rate: {verdict} ({share:.0%}). A worker hands on what raw "
        "decoding yields, uint8 pixels (1 MB per sample at 512 px: image [3, H, W], canny [1, H, W], stored "
        "channels-last), so DataLoader shared memory and the host-to-device copy move a sixth of the former "
        "float32 bytes. The float conversion to the model's inputs (`to_model_inputs`: image in [-1, 1], "
        "condition in [0, 1] with canny repeated to 3 channels, the same float32 values as before, bit for "
        "bit) runs after the transfer, on the accelerator, in `ShardDataModule.on_after_batch_transfer`; "
        f"done on the CPU in the worker's process it would cost what the last row shows ({with_float:.0%} of "
        "raw OpenCV), mostly the first touch of fresh memory: 25 MB of float32 per batch of 4 plus the int32 "
        "lookup indices, which the CPU allocator may hand back to the OS after every batch, so its cost swings "
        "from run to run; on a GPU the caching allocator keeps that memory and the lookup is one small kernel. "
        "Images are decoded straight to RGB (`IMREAD_COLOR_RGB`, no channel-reversal copy), and the batching "
        "stage (`DecodeBatches`) copies every sample's crop once, straight into its slot of the batch, the "
        "mirror (`cv2.flip`) done by that copy, instead of a flip copy and then a stacking copy (the row "
        f"batched that way: {before:.0%} of raw OpenCV, against {share:.0%}). What stays on "
        "top of the raw decode: the shard reader (webdataset's grouping plus the key, member-type and size "
        "checks from the tar headers), the image-header pixel check, the shuffle buffer and that one copy. "
        "Shards stored at 512 px make the resize a no-op; larger stored images add one."
    )


def main(argv: list[str] | None = None) -> str:
    """Entry point of ``python -m benchmarks.data_pipeline``; returns the markdown section."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds per variant (default 10)")
    parser.add_argument("--quick", action="store_true", help="few images and 2 rounds; does not write README")
    parser.add_argument("--no-write", action="store_true", help="print only, leave README.md alone")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as in a worker)")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="folder for the layouts and shards")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes, (repeats, warmup) = (QUICK, (2, 1)) if args.quick else (FULL, (args.repeats, 1))
    cache = Path(args.cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    source = ensure(cache / f"coco-{sizes.coco}", write_coco, sizes.coco)
    shards = cache / f"coco-canny-{RES}-{sizes.coco}"  # converted once; later runs find them up to date
    coco.convert(
        source / "train2017",
        source / "annotations" / "captions_train2017.json",
        shards,
        val_fraction=0.0,
        shard_size=SHARD_SIZE,
        options=coco.CannyOptions(resolution=RES),
    )
    urls = sorted(str(p) for p in shards.glob("train-*.tar"))
    throughput = interleave(
        {
            "raw PIL": lambda: raw_pil(urls),
            "raw OpenCV": lambda: raw_opencv(urls),
            OURS: ours(urls),
            PER_SAMPLE: per_sample(urls),
            OURS_FLOAT: ours(urls, convert=True),
        },
        repeats,
        warmup,
    )
    breakdown = interleave(stages(urls), repeats, warmup)
    converter_rows = time_converters(cache, sizes, max(1, repeats // 3), warmup)
    load_after = os.getloadavg()
    command = "python -m benchmarks.data_pipeline" + (" --quick" if args.quick else f" --repeats {repeats}")
    command += f" --threads {args.threads}" if args.threads != 1 else ""
    load = "/".join(f"{x:.1f}" for x in load_before) + " before, " + "/".join(f"{x:.1f}" for x in load_after)
    section = "\n\n".join(
        [
            "## Data pipeline: decode + transform + collate at 512 px, and the converters",
            f"`benchmarks/data_pipeline.py` (run `{command}`): samples per second of one process, as one "
            "DataLoader worker: `raw PIL`/`raw OpenCV` read the tar members with `tarfile` and decode the jpg and "
            "canny png to uint8 arrays, nothing else; `ours` is the `ShardDataModule` train loader "
            f"(`num_workers=0`, batch {BATCH}, shuffle buffer 1000, random crop and flip) on the same shards, "
            "its uint8 batches as they leave a worker (next rows: batched as before `DecodeBatches`, and plus the "
            "float conversion on the CPU), "
            f"made once by `data_prep.coco --resolution {RES}` from a COCO layout of {sizes.coco} crops of "
            "scikit-image's photos upscaled beyond 512 px. Converters: one worker into fresh folders, on "
            f"{sizes.ade20k} procedural ADE20K scenes and {sizes.faces} crops of `astronaut.png` of the same sizes.",
            f"Measured {datetime.date.today().isoformat()} with `{command}` on {machine()} "
            f"(torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
            f"OpenCV {cv2.__version__}, Pillow {PIL.__version__}, webdataset {wds.__version__}), load average "
            f"(1/5/15 min) {load} after; {len(urls)} shard(s) of {SHARD_SIZE} samples at {RES} px, "
            f"{repeats} interleaved rounds after {warmup} warm-up round.",
            "**Decode + transform + collate, one process (= one DataLoader worker)**",
            throughput_table(throughput),
            reading(throughput),
            "**Where our time goes** (pipeline functions on in-memory samples)",
            stages_table(breakdown),
            f"**Converters** ({max(1, repeats // 3)} interleaved rounds)",
            converters_table(converter_rows),
        ]
    )
    print(section)
    if not args.no_write and not args.quick:
        write_section(section, README, START, END)
    return section


if __name__ == "__main__":
    main()

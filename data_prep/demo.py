"""Offline demo datasets in the real on-disk layouts, converted by the real converters.

Nothing is downloaded: photos and textures are read from scikit-image's package folder
(``data_prep.assets``), the rest is drawn procedurally. Per task, under ``ROOT``:

- ``canny``: COCO 2017 layout of toy-world scenes (``src.toy.world``, written by ``data_prep.toy_world``: coloured shapes whose
  captions name them, the world the default toy backbone was pretrained on)::

      ROOT/coco/train2017/000000000001.png ...            (1088 scenes, 64 x 64)
      ROOT/coco/annotations/captions_train2017.json       (one caption per scene)
      ROOT/canny/train-*.tar                              (1024 train samples)
      ROOT/canny/val-*.tar, summary.json                  (64 val samples)

- ``seg``: ADEChallengeData2016 layout of toy-world scenes with exact shape classes (1 circle, 2 square,
  3 triangle) and their captions (1024 training + 64 validation) -> ``ROOT/seg/``.
- ``canny+seg`` (joint multi-condition training): the same ADEChallengeData2016 layout (one folder
  shared with ``seg``), converted with ``canny=True`` -> ``ROOT/canny+seg/``, whose samples carry both
  ``canny.png`` and ``seg.png``.
- ``landmarks``: a face folder of variants of ``astronaut.png`` plus two photos without a face
  (``data_prep.demo_faces``) -> ``ROOT/landmarks/`` (the two are skipped as ``no_face``).

Source layouts live under the source's name, shards under the task's name (``ROOT/{task}``, as
``conf/data/demo.yaml`` expects). ``build_demo`` returns the shard folder; a second call finds
everything in place and returns at once. When a layout is rewritten (another size), every shard folder
made from it is marked stale (``.demo-stale``) and rewritten on its next build.

    python -m data_prep.demo --task canny --root DIR
    python -m data_prep.demo --task canny+seg --root DIR
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from data_prep import ade20k, coco, faces, toy_world
from data_prep.demo_faces import write_faces_layout
from src.errors import run_cli

DEMO_VERSION = 2
DEMO_RESOLUTION = 64
#: toy-world scenes of the canny and segmentation demos (training, validation) and their world's seed.
TOY_TRAIN, TOY_VAL, TOY_SEED = 1024, 64, 100
#: same place as ``conf/paths`` + ``conf/data/demo.yaml``: ``$OFT_CONTROL_CACHE/data/demo``.
DEFAULT_ROOT = Path(os.environ.get("OFT_CONTROL_CACHE", "~/.cache/oft-control")) / "data" / "demo"


STALE = ".demo-stale"


def _ensure_layout(
    folder: Path,
    write: Callable[[Path], object],
    version: str = str(DEMO_VERSION),
    outs: tuple[Path, ...] = (),
) -> bool:
    """Write a source layout unless a complete one of this version is there; True if (re)written.

    A marker file is written last, so an interrupted build is redone from scratch. ``outs``: the shard
    folders converted from this layout (several tasks may share one); before a rewrite each existing one
    is marked stale (:func:`_stale`), so each is rewritten on its own next build.
    """
    marker = folder / ".demo-version"
    if marker.exists() and marker.read_text(encoding="utf-8").strip() == version:
        return False
    for out in outs:
        if out.is_dir():
            (out / STALE).write_text(version, encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    write(folder)
    marker.write_text(version, encoding="utf-8")
    return True


@dataclass(frozen=True)
class ToySize:
    """How many toy-world scenes a demo holds (training, validation) and how many samples per shard."""

    train: int = TOY_TRAIN
    val: int = TOY_VAL
    shard_size: int = 256

    def version(self) -> str:
        """The layout marker: the plain version for the default size (caches of earlier builds stay valid)."""
        default = self == ToySize()
        return str(DEMO_VERSION) if default else f"{DEMO_VERSION} {self.train} {self.val} {self.shard_size}"


def _build_canny(root: Path, size: ToySize = ToySize()) -> Path:
    """COCO layout of toy scenes -> canny shards through ``data_prep.coco.convert``."""
    source, out = root / "coco", root / "canny"
    rebuilt = _ensure_layout(
        source,
        lambda folder: toy_world.write_coco_layout(folder, size.train + size.val, TOY_SEED, DEMO_RESOLUTION),
        size.version(),
    )
    coco.convert(
        source / "train2017",
        source / "annotations" / "captions_train2017.json",
        out,
        val_fraction=size.val / (size.train + size.val),
        shard_size=size.shard_size,
        options=coco.CannyOptions(resolution=DEMO_RESOLUTION),
        overwrite=rebuilt,
    )
    return out


def _stale(out: Path) -> bool:
    """Whether ``out`` was converted from an earlier version of a (shared) layout that was since rewritten."""
    return (out / STALE).exists()


#: the tasks converted from the toy ADE20K layout (``ROOT/ADEChallengeData2016``, one folder for both).
ADE20K_TASKS = ("seg", "canny+seg")


def _build_ade20k(root: Path, size: ToySize, task: str) -> Path:
    """ADE20K layout of toy scenes (shared by :data:`ADE20K_TASKS`) -> ``ROOT/{task}`` shards through
    ``data_prep.ade20k.convert``, with ``canny.png`` for ``canny+seg``."""
    source, out = root / "ADEChallengeData2016", root / task
    rebuilt = _ensure_layout(
        source,
        lambda folder: toy_world.write_ade20k_layout(folder, size.train, size.val, TOY_SEED, DEMO_RESOLUTION),
        size.version(),
        outs=tuple(root / name for name in ADE20K_TASKS),
    )
    ade20k.convert(
        source,
        out,
        captions=source / "captions.json",
        shard_size=size.shard_size,
        options=ade20k.SegOptions(resolution=DEMO_RESOLUTION, canny=task == "canny+seg"),
        overwrite=rebuilt or _stale(out),
    )
    (out / STALE).unlink(missing_ok=True)
    return out


def _build_seg(root: Path, size: ToySize = ToySize()) -> Path:
    """ADE20K layout of toy scenes -> segmentation shards through ``data_prep.ade20k.convert``."""
    return _build_ade20k(root, size, "seg")


def _build_canny_seg(root: Path, size: ToySize = ToySize()) -> Path:
    """The same ADE20K layout -> shards with ``canny.png`` and ``seg.png`` (task condition ``canny+seg``)."""
    return _build_ade20k(root, size, "canny+seg")


def _build_landmarks(root: Path, size: ToySize = ToySize()) -> Path:
    """Face folder (astronaut variants) -> landmark shards through ``data_prep.faces.convert``."""
    source, out = root / "faces", root / "landmarks"
    rebuilt = _ensure_layout(source, write_faces_layout)
    faces.convert(
        source / "images",
        out,
        captions=source / "captions.json",
        val_fraction=0.2,
        shard_size=16,
        options=faces.FaceOptions(resolution=DEMO_RESOLUTION),
        overwrite=rebuilt,
    )
    return out


BUILDERS: dict[str, Callable[[Path, ToySize], Path]] = {
    "canny": _build_canny,
    "seg": _build_seg,
    "canny+seg": _build_canny_seg,
    "landmarks": _build_landmarks,
}


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Exclusive lock on ``root`` so concurrent builders (e.g. test workers) do not interleave."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_demo(
    task: str = "canny",
    root: str | Path = DEFAULT_ROOT,
    train_scenes: int = TOY_TRAIN,
    val_scenes: int = TOY_VAL,
    shard_size: int = 256,
) -> Path:
    """Build (once) the demo dataset for ``task`` under ``root``; return its shard folder.

    The folder holds ``train-*.tar``, ``val-*.tar`` and ``summary.json``. Idempotent and offline.
    ``train_scenes``, ``val_scenes`` and ``shard_size`` size the toy-world demos (canny, seg, canny+seg;
    e.g. 16384 training scenes and two validation shards of 64 for ``benchmarks.controllability``); a root
    built at another size is rebuilt. The landmark demo has one size.
    """
    if task not in BUILDERS:
        raise ValueError(f"no demo data for task {task!r}; supported: {sorted(BUILDERS)}")
    if min(train_scenes, val_scenes, shard_size) < 1:
        raise ValueError(f"demo sizes must be >= 1: {train_scenes=}, {val_scenes=}, {shard_size=}")
    root = Path(root).expanduser()
    with _locked(root):
        return BUILDERS[task](root, ToySize(int(train_scenes), int(val_scenes), int(shard_size)))


def main(argv: list[str] | None = None) -> Path:
    """Entry point of ``python -m data_prep.demo``."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--task", default="canny", help=f"one of {sorted(BUILDERS)}")
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="where the layout and shards go")
    parser.add_argument("--train-scenes", type=int, default=TOY_TRAIN, help="toy-world training scenes")
    parser.add_argument("--val-scenes", type=int, default=TOY_VAL, help="toy-world validation scenes")
    parser.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    args = parser.parse_args(argv)
    out = build_demo(args.task, args.root, args.train_scenes, args.val_scenes, args.shard_size)
    print(out)
    return out


if __name__ == "__main__":
    run_cli(main)

"""Hostile inputs to the converters: a second converter into the same --out is refused, a stale lock is taken
over, malformed captions JSON is one line naming the file, a read-only or full output folder is one line with
no partial shard left, file_name paths outside --images are never opened, source images obey the pixel limit.

Every hostile input is built here, in a temporary folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import png_header_only, read_shards, run_module
from PIL import Image

from data_prep import ade20k, coco
from data_prep.captions import load_captions
from data_prep.shards import SourceItem, write_dataset
from src.data import schema
from src.errors import InputError, OutputError
from src.locks import LOCK_NAME, FolderLock, FolderLockedError

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _coco(root: Path, n: int = 3, extra_images: list[dict] | None = None) -> tuple[Path, Path]:
    """A COCO layout of `n` small pictures; `extra_images` are more `images` entries (with captions)."""
    (root / "train2017").mkdir(parents=True)
    images, anns = [], []
    for image_id in range(1, n + 1):
        name = f"{image_id:012d}.jpg"
        rgb = np.random.default_rng(image_id).integers(0, 255, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(root / "train2017" / name)
        images.append({"id": image_id, "file_name": name, "width": 32, "height": 24})
    images += extra_images or []
    anns = [{"id": i["id"], "image_id": i["id"], "caption": f"picture {i['id']}"} for i in images]
    captions = root / "captions.json"
    captions.write_text(json.dumps({"images": images, "annotations": anns}))
    return root / "train2017", captions


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    """The single `error: ...` line of a failed entry point: exit status 2, no traceback, the last line on
    stderr (a progress bar may come before it)."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and errors == lines[-1:], done.stderr[-2000:]
    return errors[0]


# ------------------------------------------------------------------------------------------- locks
HOLDER = """
import sys, time
from pathlib import Path
from src.locks import FolderLock
with FolderLock(sys.argv[1], "holding it for a test"):
    Path(sys.argv[2]).write_text("held")
    time.sleep(600)
"""


@contextlib.contextmanager
def _held(folder: Path, tmp_path: Path):
    """A subprocess holding `folder`'s lock until the block ends (then killed: its lock goes stale)."""
    marker = tmp_path / f"held-{folder.name}"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(marker)], cwd=REPO, env=ENV)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the holder did not start"
            time.sleep(0.05)
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_second_converter_into_one_out_is_refused_naming_the_first(tmp_path: Path):
    images, captions = _coco(tmp_path / "coco")
    out = tmp_path / "out"
    with _held(out, tmp_path) as holder:
        with pytest.raises(
            FolderLockedError, match=f"in use by process {holder.pid} .*holding it for a test"
        ):
            coco.convert(images, captions, out, val_fraction=0.0)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing of the second one
    # the holder was killed -9: its lock file is stale and the next converter takes it over
    assert (out / LOCK_NAME).read_text().split()[0] == str(holder.pid)
    summary = coco.convert(images, captions, out, val_fraction=0.0)
    assert summary["written"] == 3 and not (out / LOCK_NAME).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(f"{dead.pid}\nconversion: coco2017 shards\non a host\n")
    with caplog.at_level(logging.WARNING, "src.locks"), FolderLock(tmp_path, "test") as lock:
        assert (tmp_path / LOCK_NAME).read_text().split("\n")[:2] == [str(os.getpid()), "test"]
        with pytest.raises(FolderLockedError, match=f"process {os.getpid()} \\(test"):
            FolderLock(tmp_path, "another").acquire()  # refused even within one process
    assert f"took over the stale lock {lock.path} of process {dead.pid} (no longer running)" in caplog.text
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_finished_dataset_is_read_without_the_lock(tmp_path: Path):
    images, captions = _coco(tmp_path / "coco")
    first = coco.convert(images, captions, tmp_path / "out", val_fraction=0.0)
    with _held(tmp_path / "out", tmp_path):  # e.g. two trainings building the same demo data
        assert coco.convert(images, captions, tmp_path / "out", val_fraction=0.0) == first


# ------------------------------------------------------------------------------ malformed captions
@pytest.mark.parametrize(
    "content,message",
    [
        ('{"images": [], "annotations": [', "is not valid JSON: Expecting value at line 1, column 32"),
        (b"\xff\xfe{}", "is not UTF-8 text"),
        ("[1, 2]", "is not a COCO captions file: expected an object with an 'images' list"),
        ('{"images": []}', "expected an 'annotations' list"),
        (
            '{"images": [], "annotations": [{"image_id": 1}]}',
            r"annotations\[0\] needs an 'image_id' and a text",
        ),
        ('{"images": [{"id": 1}], "annotations": []}', r"images\[0\] needs an 'id' and a 'file_name'"),
    ],
)
def test_malformed_coco_captions_name_the_file_and_what_is_wrong(tmp_path: Path, content, message):
    images, _ = _coco(tmp_path / "coco")
    bad = tmp_path / "bad captions.json"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InputError, match=message) as info:
        coco.convert(images, bad, tmp_path / "out")
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "content,message",
    [
        ("{oops", "is not valid JSON"),
        ('["a"]', "expected a JSON object"),
        ('{"x": 3}', "of 'x' must be a string"),
    ],
)
def test_malformed_captions_for_ade20k_and_faces_name_the_file(tmp_path: Path, content, message):
    bad = tmp_path / "captions.json"
    bad.write_text(content)
    with pytest.raises(InputError, match=message) as info:
        load_captions(bad)
    assert str(bad) in str(info.value)


def test_the_converter_cli_prints_one_line_and_exits_2(tmp_path: Path):
    images, _ = _coco(tmp_path / "coco")
    bad = tmp_path / "captions.json"
    bad.write_text('{"images": [}')
    line = _one_error_line(
        run_module(
            "data_prep.coco", "--images", str(images), "--captions", str(bad), "--out", str(tmp_path / "o")
        )
    )
    assert line == f"error: --captions {bad} is not valid JSON: Expecting value at line 1, column 13"
    debug = run_module(
        "data_prep.coco",
        "--images",
        str(images),
        "--captions",
        str(bad),
        "--out",
        str(tmp_path / "o"),
        "--debug",
    )
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "InputError" in debug.stderr


# ------------------------------------------------------------------------- read-only or full output
@contextlib.contextmanager
def _read_only(folder: Path):
    """`folder` made read-only: mode 0555, and for root (whom modes do not stop) the immutable flag."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    immutable = False
    try:
        probe = folder / "probe"
        try:
            probe.write_text("")
            probe.unlink()
            immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
            if not immutable:
                pytest.skip("cannot make a folder read-only here (root without chattr)")
        except PermissionError:
            pass
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_a_read_only_output_folder_is_one_line(tmp_path: Path):
    images, captions = _coco(tmp_path / "coco")
    with _read_only(tmp_path / "ro") as out:
        line = _one_error_line(
            run_module(
                "data_prep.coco", "--images", str(images), "--captions", str(captions), "--out", str(out)
            )
        )
        assert f"cannot write to output folder {out}" in line and "read-only or full" in line
        assert not any(out.iterdir())


def _limit_file_size(limit: int):
    def apply() -> None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_output_folder_is_one_line_and_leaves_no_partial_shard(tmp_path: Path):
    """A disk that fills up mid-shard (RLIMIT_FSIZE makes every write past 40 KB fail)."""
    images, captions = _coco(tmp_path / "coco", n=12)
    out = tmp_path / "full"
    args = ["--images", str(images), "--captions", str(captions), "--out", str(out), "--val-fraction", "0"]
    line = _one_error_line(
        run_module("data_prep.coco", *args, "--resolution", "64", preexec=_limit_file_size(40_000))
    )
    assert f"cannot write {out}/.train-000000.tar.tmp: File too large" in line and "read-only or full" in line
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.tar")) and not (out / LOCK_NAME).exists()
    assert (
        coco.main(args + ["--resolution", "64"])["written"] == 12
    )  # with room again, the same command works


def test_a_failing_shard_write_removes_its_temporary_file_in_process(tmp_path: Path, monkeypatch):
    """ENOSPC in the middle of a shard: one OutputError line, and the partial temporary shard is gone."""
    from data_prep import shards

    created: list[Path] = []

    class FillsUp:
        def __init__(self, path, mode):
            self._file = open(path, mode)  # noqa: SIM115 - closed by close()
            created.append(Path(path))

        def write(self, data):
            if self._file.tell() > 1000:
                raise OSError(28, "No space left on device")
            return self._file.write(data)

        def __getattr__(self, name):
            return getattr(self._file, name)

    def make(item: SourceItem) -> dict[str, bytes]:
        return {"jpg": b"\xff\xd8" + b"x" * 400 + b"\xff\xd9", "txt": b"t", "json": b"{}"}

    monkeypatch.setattr(shards, "open", FillsUp, raising=False)
    with pytest.raises(OutputError, match="No space left on device .*read-only or full"):
        write_dataset([SourceItem(str(i)) for i in range(6)], make, tmp_path, dataset="x", settings={})
    assert [p.name for p in created] == [".train-000000.tar.tmp"] and not created[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_state"]


# ------------------------------------------------------------------------------ paths and pixel limit
def test_file_names_outside_images_are_never_opened(tmp_path: Path, monkeypatch):
    secret = tmp_path / "secret.jpg"
    Image.fromarray(np.full((24, 32, 3), 200, np.uint8)).save(secret)
    extra = [
        {"id": 90, "file_name": "../secret.jpg", "width": 32, "height": 24},
        {"id": 91, "file_name": str(secret), "width": 32, "height": 24},
        {"id": 92, "file_name": "sub/../../secret.jpg", "width": 32, "height": 24},
    ]
    images, captions = _coco(tmp_path / "coco", extra_images=extra)
    opened: list[str] = []
    real = coco.load_rgb
    monkeypatch.setattr(coco, "load_rgb", lambda path: (opened.append(str(path)), real(path))[1])
    summary = coco.convert(images, captions, tmp_path / "out", val_fraction=0.0)
    assert summary["skipped"] == {"unsafe_path": 3} and summary["written"] == 3
    assert len(opened) == 3 and all(Path(p).parent == images for p in opened)
    assert sorted(read_shards(tmp_path / "out")) == [f"coco2017_{i}" for i in (1, 2, 3)]


def test_converters_refuse_source_images_over_the_pixel_limit_from_their_header(tmp_path: Path):
    """The training pipeline's limit (4096^2) is checked on the header before decoding: a 5000^2 PNG of a
    few dozen bytes is `image_too_large`, not `unreadable_image` (which decoding its missing data gives)."""
    assert schema.MAX_IMAGE_PIXELS < 5000 * 5000
    extra = [{"id": 50, "file_name": "bomb.jpg", "width": 5000, "height": 5000}]
    images, captions = _coco(tmp_path / "coco", extra_images=extra)
    (images / "bomb.jpg").write_bytes(png_header_only(5000, 5000))
    summary = coco.convert(images, captions, tmp_path / "out", val_fraction=0.0)
    assert summary["skipped"] == {"image_too_large": 1} and summary["written"] == 3
    root = tmp_path / "ade"
    for sub in ("images", "annotations"):
        (root / sub / "training").mkdir(parents=True)
    for name, size in (("ADE_1", 5000), ("ADE_2", 20000)):  # ours, and beyond PIL's own bomb limit
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "images" / "training" / f"{name}.jpg")
        (root / "annotations" / "training" / f"{name}.png").write_bytes(
            png_header_only(size, size, channels=1)
        )
    summary = ade20k.convert(root, tmp_path / "ade-out", folders=("training",))
    assert summary["skipped"] == {"annotation_too_large": 2}

"""Hostile shards: unsafe keys, links, devices, duplicates, empty members, pixel bombs, oversized members and
captions are named, counted skips for every reader; nothing is written outside an output folder; a training
run over all of them next to good samples finishes with every reason counted and bounded memory.

Every hostile input is built here, in a temporary folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import (
    RES,
    STEPS,
    compose_config,
    good_members,
    make_datamodule,
    png_header_only,
    special_member,
    write_shard,
    write_tar,
)

from src.data import schema
from src.data.health import COUNTS_KEY, SkipCounter
from src.data.inputs import collect_inputs
from src.data.reader import ShardReader

ROOT = Path(__file__).resolve().parents[1]
N_GOOD = 8
GIB = 2**30


def _members(key: str, members: dict[str, bytes]) -> list[tuple[str, bytes]]:
    return [(f"{key}.{ext}", data) for ext, data in members.items()]


def hostile_entries(
    outside: Path, bomb: tuple[int, int] = (30000, 30000), huge: int = 4 * schema.MAX_MEMBER_BYTES
) -> tuple[list, dict[str, int]]:
    """Tar entries with one sample of every hostile kind (first) and N_GOOD good samples (last), and the
    skip counts a reader must report. `outside` is the folder the unsafe keys point into; `bomb` the size
    a PNG header declares; `huge` the size of a member (sparse on disk) over the default byte limit."""
    good = good_members(99)
    rest = {k: v for k, v in good.items() if k != "jpg"}
    entries: list = []
    for key in (f"../../../../../..{outside}/escape", f"{outside}/absolute", "dir/nested", "bad key", "ç"):
        entries += _members(key, good)  # unsafe_key x 5
    entries += [(f"dot.v2.{ext}", data) for ext, data in good.items()]  # dotted_key
    entries += [special_member("symlink.jpg", tarfile.SYMTYPE, "/etc/passwd"), *_members("symlink", rest)]
    entries += [special_member("hardlink.jpg", tarfile.LNKTYPE, "good0.jpg"), *_members("hardlink", rest)]
    entries += [special_member("chrdev.jpg", tarfile.CHRTYPE), *_members("chrdev", rest)]
    entries += [special_member("fifo.jpg", tarfile.FIFOTYPE), *_members("fifo", rest)]
    entries += [("dup.jpg", good["jpg"]), ("dup.jpg", good["jpg"]), *_members("dup", rest)]
    entries += _members("emptyjpg", {**good, "jpg": b""})
    entries += _members("bomb", {**good, "canny.png": png_header_only(*bomb, channels=1)})
    entries += [("huge.jpg", None, huge), *_members("huge", rest)]  # sparse on disk: a few KB
    entries += _members("longcap", {**good, "txt": b"a" * (4 * schema.MAX_CAPTION_CHARS + 1)})
    entries += _members("longcap2", {**good, "txt": "é".encode() * (schema.MAX_CAPTION_CHARS + 1)})
    entries += _members("pickles", {**good, "pyd": b"\x80\x04N."})  # kept: the .pyd is never read
    for index in range(N_GOOD):
        entries += _members(f"good{index}", good_members(index))
    counts = {
        "unsafe_key": 5,
        "dotted_key": 1,
        "link_member": 2,
        "device_member": 2,
        "duplicate_member": 1,
        "empty_member": 1,
        "image_too_large": 1,
        "member_too_large": 1,
        "caption_too_long": 2,
    }
    return entries, counts


def _summed(batches: list[dict]) -> Counter:
    return sum((Counter(batch[COUNTS_KEY]) for batch in batches), Counter())


# ----------------------------------------------------------------------------- every reader
@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_hostile_kind_is_a_named_counted_skip_and_good_samples_stay(tmp_path: Path, num_workers: int):
    entries, counts = hostile_entries(tmp_path / "outside")
    for index in range(2):  # one shard per worker
        write_tar(tmp_path / f"hostile-{index:06d}.tar", entries)
    spec = str(tmp_path / "hostile-*.tar")
    dm = make_datamodule(spec, spec, num_workers=num_workers)
    batches = list(dm.val_dataloader())
    keys = sorted(k for batch in batches for k in batch["key"])
    assert keys == sorted(2 * ["pickles", *(f"good{i}" for i in range(N_GOOD))])
    summed = _summed(batches)
    skipped = {k[len("skipped/") :]: v for k, v in summed.items() if k.startswith("skipped/")}
    assert skipped == {reason: 2 * count for reason, count in counts.items()}
    assert summed["decoded"] == 2 * (N_GOOD + 1) and summed["noted/unexpected_member"] == 2
    assert not (tmp_path / "outside").exists()
    train = list(make_datamodule(spec, num_workers=num_workers, batch_size=1).train_dataloader())
    assert _summed(train)["skipped/unsafe_key"] == 2 * counts["unsafe_key"]


def test_the_shard_reader_reads_no_byte_of_a_refused_member(tmp_path: Path, monkeypatch):
    """Header-level refusals happen before `extractfile`: a member over the limit is never read."""
    write_tar(
        tmp_path / "s.tar",
        [
            ("huge.jpg", None, 4 * schema.MAX_MEMBER_BYTES),
            ("huge.txt", b"x"),
            *_members("ok", good_members(1)),
        ],
    )
    read: list[str] = []
    original = tarfile.TarFile.extractfile

    def spy(self, member):
        read.append(member.name)
        return original(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", spy)
    skips = SkipCounter("test")
    samples = list(ShardReader(skips)([str(tmp_path / "s.tar")]))
    assert [s["__key__"] for s in samples] == ["ok"] and skips.counts == {"member_too_large": 1}
    assert not any(name.startswith("huge") for name in read)


def test_a_dotted_key_is_a_counted_lost_sample_and_a_dotted_extra_member_is_only_noted(tmp_path: Path):
    good = good_members(2)
    entries = _members("img", good) + [(f"img.v2.{ext}", data) for ext, data in good.items()]
    entries += [(f"solo.v3.{ext}", data) for ext, data in good.items()]  # no sample of its own left
    entries += _members("meta", good) + [("meta.extra.json", b"{}")]  # an extra member of `meta`
    write_tar(tmp_path / "d.tar", entries)
    skips = SkipCounter("test")
    samples = list(ShardReader(skips)([str(tmp_path / "d.tar")]))
    assert [s["__key__"] for s in samples] == ["img", "meta"]
    assert set(samples[0]) == {"__key__", "__url__", *good} and samples[0]["jpg"] == good["jpg"]
    assert skips.counts == {"dotted_key": 2} and skips.notes == {"unexpected_member": 1}


def test_limits_come_from_the_data_config_and_are_checked(tmp_path: Path):
    data = compose_config("data=shards", "data.train_shards=x").data
    defaults = (data.max_member_bytes, data.max_image_pixels, data.max_caption_chars)
    assert defaults == (schema.MAX_MEMBER_BYTES, schema.MAX_IMAGE_PIXELS, schema.MAX_CAPTION_CHARS)
    write_shard(tmp_path / "p-000000.tar", {f"k{i}": good_members(i) for i in range(3)})
    spec = str(tmp_path / "p-*.tar")
    for limit, reason in (
        ({"max_image_pixels": RES * RES - 1}, "image_too_large"),
        ({"max_member_bytes": 100}, "member_too_large"),
        ({"max_caption_chars": 3}, "caption_too_long"),
    ):
        dm = make_datamodule(spec, spec, **limit)
        assert not list(dm.val_dataloader())  # every sample over the limit (no batch carries counts)
        assert dm.val_skips.counts == {reason: 3}
    assert len(list(make_datamodule(spec, spec).val_dataloader())[0]["key"]) == 3
    with pytest.raises(ValueError, match="data.max_image_pixels must be a positive integer"):
        make_datamodule(str(tmp_path / "p-*.tar"), max_image_pixels=0)


def test_pixel_bombs_are_refused_from_the_header_and_allocation_failures_are_counted(monkeypatch):
    bomb = png_header_only(40000, 40000)
    assert schema.image_header_size(bomb) == (40000, 40000) and len(bomb) < 100
    jpeg = schema.encode_member("jpg", np.zeros((37, 53, 3), np.uint8))
    assert schema.image_header_size(jpeg) == (53, 37)
    for member in ("jpg", "seg.png", "canny.png", "seglabel.png"):
        with pytest.raises(schema.SampleError) as info:
            schema.decode_member(member, bomb)
        assert info.value.reason == "image_too_large" and "data.max_image_pixels" in str(info.value)
        with pytest.raises(schema.SampleError) as info:
            schema.decode_member(member, b"")
        assert info.value.reason == "empty_member"

    def no_memory(*args):
        raise cv2.error("OpenCV(4.11.0) alloc.cpp:73: error: (-4:Insufficient memory) Failed to allocate")

    monkeypatch.setattr(schema.cv2, "imdecode", no_memory)
    with pytest.raises(schema.SampleError) as info:
        schema.decode_member("jpg", jpeg)
    assert info.value.reason == "allocation_failed"
    monkeypatch.setattr(schema.cv2, "imdecode", lambda *a: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(schema.SampleError) as info:
        schema.decode_member("jpg", jpeg)
    assert info.value.reason == "allocation_failed"


# ----------------------------------------------------------------------------------- keys and paths
@pytest.mark.parametrize(
    "key,why",
    [
        ("/etc/x", "absolute"),
        ("../x", "'..'"),
        ("a/../../b", "'..'"),
        ("a/b", "separator"),
        ("a\\b", "separator"),
        ("a.b", "characters"),
        ("a b", "characters"),
        ("ключ", "characters"),
        ("x\n", "characters"),
        ("", "empty"),
        ("k" * 201, "longer"),
    ],
)
def test_unsafe_keys_are_refused_in_one_place_and_no_path_is_built_from_them(tmp_path: Path, key, why):
    with pytest.raises(schema.SampleError, match=why) as info:
        schema.check_key(key)
    assert info.value.reason == "unsafe_key"
    with pytest.raises(schema.SampleError):
        schema.key_path(tmp_path, key, ".png")
    assert schema.key_path(tmp_path, schema.safe_key(key), "_00.png").parent == tmp_path


def test_generate_from_traversal_and_absolute_keys_writes_nothing_outside_out_dir(
    trained_run, tmp_path: Path
):
    from src.generate import generate

    outside = tmp_path / "outside"
    outside.mkdir()
    good = good_members(3)
    entries = _members("../../outside/escape", good) + _members(str(outside / "absolute"), good)
    entries += _members("fine", good)
    write_tar(tmp_path / "keys.tar", entries)
    out = tmp_path / "out"
    cfg = compose_config(
        f"run={trained_run}",
        f"condition={tmp_path / 'keys.tar'}",
        "prompt=a red circle",
        f"sampling.num_inference_steps={STEPS}",
        name="generate",
        output_dir=out,
    )
    record = generate(cfg)
    assert [r["file"] for r in record["images"]] == ["images/fine_00.png"]
    assert not any(outside.iterdir())
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    assert written == ["out/grid.png", "out/images/fine_00.png"]


def test_image_folder_inputs_get_safe_distinct_keys(tmp_path: Path):
    from PIL import Image

    for name in ("a b.png", "a_b.png", "sub/a b.png", "x.v2.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name)
    keys = [item.key for item in collect_inputs(tmp_path, "canny", 8)]
    assert len(set(keys)) == 4 and all(schema.check_key(k) for k in keys)


# ------------------------------------------------------------------- training under a memory limit
TRAIN_UNDER_LIMIT = """
import json, os, resource, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from helpers import compose_config
from src.train import train

def vm_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1])

import torch, diffusers, pytorch_lightning  # the big mappings first, then the limit
headroom = int(sys.argv[4])
limit = vm_kib() * 1024 + headroom
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
cfg = compose_config(
    "debug=default", "data=shards", f"data.train_shards={sys.argv[3]}", "data.val_shards=null",
    "data.num_workers=0", "data.batch_size=2", "data.shuffle_buffer=1", "trainer.max_steps=%d",
    "trainer.val_check_interval=1000", "~callbacks.samples", "~callbacks.controllability", "~callbacks.energy",
    "callbacks.data_health.max_skip_fraction=1.0", "callbacks.data_health.min_samples=0",
    "data.max_image_pixels=1050000000", output_dir=sys.argv[5],
)
metrics = train(cfg)
usage = resource.getrusage(resource.RUSAGE_SELF)
json.dump({"metrics": metrics, "maxrss_kib": usage.ru_maxrss, "limit": limit}, open(sys.argv[6], "w"))
"""


def test_training_on_every_hostile_kind_counts_every_reason_under_a_memory_limit(tmp_path: Path):
    """A real `src.train.train` in a subprocess whose address space is capped at its size after imports
    plus 2.5 GB: the pixel bomb (40000^2 declared, 4.8 GB decoded) is refused from its header, the
    allocation bomb (32000^2 RGB, 3 GB: under the raised pixel limit and cv2's own) fails to allocate
    and is counted, the 2 GiB member is never read, and the run finishes."""
    entries, counts = hostile_entries(tmp_path / "outside", bomb=(40000, 40000), huge=2 * GIB)
    entries[:0] = _members("allocbomb", {**good_members(5), "jpg": png_header_only(32000, 32000)})
    counts["allocation_failed"] = 1
    write_tar(tmp_path / "train-000000.tar", entries)
    script = tmp_path / "train_under_limit.py"
    script.write_text(TRAIN_UNDER_LIMIT % (N_GOOD // 2))  # one pass: pickles + good, batches of 2
    result = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    args = [
        str(ROOT / "tests"),
        str(ROOT),
        str(tmp_path / "train-*.tar"),
        str(int(2.5 * GIB)),
        str(tmp_path / "run"),
    ]
    done = subprocess.run(
        [sys.executable, str(script), *args, str(result)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(result.read_text())
    metrics = report["metrics"]
    skipped = {k[len("data/skipped/") :]: int(v) for k, v in metrics.items() if k.startswith("data/skipped/")}
    assert skipped == counts
    assert metrics["data/decoded"] == N_GOOD + 1 - 1  # batches of 2: the last sample waits for a partner
    assert report["maxrss_kib"] * 1024 < 2 * GIB  # any bomb decoded would have taken 3 GB or more
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))

"""Interrupted conversions: a converter killed mid-write leaves no finished-looking shard, and a re-run
completes the dataset with the same bytes as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import read_shard

from data_prep.shards import SourceItem, plan_shards

REPO = Path(__file__).resolve().parents[1]
N_ITEMS, SHARD_SIZE = 12, 4

#: A converter run in a subprocess: 12 fake items, one of them corrupt; with $STALL_AT set it touches
#: $MARKER and sleeps while writing that item, so the test can kill it at a known point.
CONVERTER = """
import os, sys, time
from pathlib import Path
import numpy as np
from data_prep.shards import SourceItem, write_dataset
from src.data import schema

def make_sample(item):
    if item.source_id == os.environ.get("STALL_AT"):
        Path(os.environ["MARKER"]).write_text("writing")
        time.sleep(600)
    if item.source_id == "5":
        raise schema.SampleError("unreadable_image", "corrupt source")
    rgb = np.random.default_rng(int(item.source_id)).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    return {"jpg": schema.encode_member("jpg", rgb), "txt": f"item {item.source_id}".encode(),
            "json": schema.encode_member("json", {"source_id": item.source_id})}

items = [SourceItem(str(i)) for i in range(int(sys.argv[2]))]
write_dataset(items, make_sample, sys.argv[1], dataset="fake", settings={"v": 1}, val_fraction=0.0,
              shard_size=int(sys.argv[3]), workers=1)
"""


def _run(script: Path, out: Path, **env: str) -> subprocess.Popen:
    environ = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.Popen(
        [sys.executable, str(script), str(out), str(N_ITEMS), str(SHARD_SIZE)],
        env=environ,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"converter exited early: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("converter never reached the stall point")
        time.sleep(0.05)


def test_sigkill_mid_shard_leaves_no_finished_looking_shard_and_rerun_matches(tmp_path: Path) -> None:
    script = tmp_path / "convert.py"
    script.write_text(CONVERTER)
    plans = plan_shards([SourceItem(str(i)) for i in range(N_ITEMS)], val_fraction=0.0, shard_size=SHARD_SIZE)
    stall = plans[1].items[2].source_id  # third item of the second shard
    reference, out = tmp_path / "reference", tmp_path / "killed"
    assert _run(script, reference).wait(timeout=300) == 0

    proc = _run(script, out, STALL_AT=stall, MARKER=str(tmp_path / "marker"))
    _wait_for(tmp_path / "marker", proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    finished = sorted(p.name for p in out.glob("*.tar"))
    assert finished == [plans[0].name]  # only the shard completed before the kill
    assert (out / plans[0].name).read_bytes() == (reference / plans[0].name).read_bytes()
    assert (out / f".{plans[1].name}.tmp").exists() and not (out / "summary.json").exists()

    assert _run(script, out).wait(timeout=300) == 0  # the re-run completes the dataset
    names = sorted(p.name for p in reference.glob("*.tar"))
    assert names == sorted(p.name for p in out.glob("*.tar")) == sorted(p.name for p in plans)
    for name in names:
        assert (out / name).read_bytes() == (reference / name).read_bytes() and len(
            read_shard(out / name)
        ) > 0
    assert not list(out.glob(".*.tmp"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards_reused"] == 1 and summary["skipped"] == {"unreadable_image": 1}
    assert summary["written"] == N_ITEMS - 1


@pytest.mark.parametrize("content", [b"", b"{truncated"])
def test_unreadable_state_file_means_the_shard_is_rewritten(tmp_path: Path, content: bytes) -> None:
    from data_prep.shards import write_dataset

    def make_sample(item: SourceItem) -> dict[str, bytes]:
        return {"jpg": b"\xff\xd8fake\xff\xd9", "txt": item.source_id.encode(), "json": b"{}"}

    items = [SourceItem(str(i)) for i in range(4)]
    kw = dict(dataset="fake", settings={}, val_fraction=0.0, shard_size=2)
    write_dataset(items, make_sample, tmp_path, **kw)
    original = (tmp_path / "train-000000.tar").read_bytes()
    (tmp_path / "_state" / "train-000000.tar.json").write_bytes(content)  # e.g. lost in a power cut
    (tmp_path / "summary.json").unlink()
    summary = write_dataset(items, make_sample, tmp_path, **kw)
    assert summary["shards_written"] == 1 and (tmp_path / "train-000000.tar").read_bytes() == original

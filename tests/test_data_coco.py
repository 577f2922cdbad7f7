"""COCO converter + shard writer on a tiny dataset in the real COCO 2017 layout."""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import webdataset as wds
from helpers import read_shard
from PIL import Image

from data_prep import coco
from data_prep.shards import SourceItem, plan_shards
from src.data.transforms import resize_center_crop

N_GOOD = 7  # images with captions that decode
MEMBERS = {"jpg", "txt", "json", "canny.png"}


def _picture(seed: int, height: int, width: int) -> np.ndarray:
    """A small RGB picture with edges: shapes on a smooth gradient plus a little noise."""
    rng = np.random.default_rng(seed)
    gradient = np.linspace(40, 200, width, dtype=np.float32)[None, :, None]
    rgb = np.broadcast_to(gradient, (height, width, 3)).copy()
    rgb += rng.normal(0, 4, rgb.shape)
    rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    cv2.circle(rgb, (width // 3, height // 2), min(height, width) // 4, (230, 30, 30), -1)
    cv2.rectangle(rgb, (width // 2, 4), (width - 5, height // 2), (20, 20, 160), 2)
    return rgb


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    """COCO layout: N_GOOD good images, one without captions, one corrupt, one truncated, one missing."""
    root = tmp_path / "coco"
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns = [], []
    for image_id in range(1, N_GOOD + 5):
        name = f"{image_id:012d}.jpg"
        height, width = 40 + 4 * image_id, 56 - 2 * image_id
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        if image_id != N_GOOD + 1:  # this one has no captions
            anns += [
                {"id": 100 * image_id + k, "image_id": image_id, "caption": f"picture {image_id} nr {k}"}
                for k in (3, 1, 5, 2, 4)
            ]
        buffer = io.BytesIO()
        Image.fromarray(_picture(image_id, height, width)).save(buffer, format="JPEG", quality=90)
        data = buffer.getvalue()
        if image_id == N_GOOD + 2:
            data = b"this is not a jpeg" * 10
        elif image_id == N_GOOD + 3:
            data = data[: len(data) // 2]
        if image_id != N_GOOD + 4:  # the last one is listed but missing on disk
            (root / "train2017" / name).write_bytes(data)
    captions = {"info": {}, "images": images, "annotations": anns}
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps(captions))
    return root


def _convert(root: Path, out: Path, **kw):
    kw.setdefault("val_fraction", 0.2)  # 10 captioned images: 2 val, 8 train
    kw.setdefault("shard_size", 3)  # train shards of 3, 3 and 2 (skips make them smaller)
    return coco.convert(root / "train2017", root / "annotations" / "captions_train2017.json", out, **kw)


def _file_states(out: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.rglob("*")}


def test_shards_layout_members_and_summary(coco_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    summary = _convert(coco_root, out)
    names = sorted(p.name for p in out.glob("*.tar"))
    assert names == ["train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar"]
    per_shard = {name: read_shard(out / name) for name in names}
    samples = {k: v for shard in per_shard.values() for k, v in shard.items()}
    assert len(samples) == summary["written"] == N_GOOD
    assert all(set(members) == MEMBERS for members in samples.values())
    assert all("." not in key for key in samples)
    assert summary["skipped"] == {"missing_image": 1, "no_captions": 1, "unreadable_image": 2}
    for split in ("train", "val"):
        in_split = sum(len(v) for k, v in per_shard.items() if k.startswith(split))
        assert summary["splits"][split]["samples"] == in_split
    assert json.loads((out / "summary.json").read_text()) == summary


def test_stock_webdataset_reads_the_shards(coco_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    _convert(coco_root, out)
    summary = _convert(coco_root, out)
    dataset = wds.WebDataset(str(out / "train-{000000..000002}.tar"), shardshuffle=False)
    samples = list(dataset)
    assert len(samples) == summary["splits"]["train"]["samples"] > 0
    for sample in samples:
        assert set(sample) - {"__key__", "__url__", "__local_path__"} == MEMBERS
        meta = json.loads(sample["json"])
        assert meta["source"] == "coco2017" and sample["txt"].decode() == meta["captions"][0]
        assert len(meta["captions"]) == 5 and meta["canny"] == {"low": 100, "high": 200, "on": "gray"}
        assert meta["captions"][0] == f"picture {meta['source_id']} nr 1"  # lowest annotation id


@pytest.mark.parametrize("resolution", [None, 24])
def test_canny_is_bit_exact_on_the_pre_encoding_image(coco_root: Path, tmp_path: Path, resolution) -> None:
    out = tmp_path / "shards"
    _convert(coco_root, out, options=coco.CannyOptions(resolution=resolution))
    for shard in out.glob("*.tar"):
        for members in read_shard(shard).values():
            meta = json.loads(members["json"])
            rgb = np.asarray(Image.open(coco_root / "train2017" / meta["file_name"]).convert("RGB"))
            if resolution is not None:
                rgb = resize_center_crop(rgb, resolution)
            expected = cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), 100, 200)
            stored = cv2.imdecode(np.frombuffer(members["canny.png"], np.uint8), cv2.IMREAD_UNCHANGED)
            assert stored.dtype == np.uint8 and stored.ndim == 2
            np.testing.assert_array_equal(stored, expected)
            assert set(np.unique(stored)) <= {0, 255} and stored.any()
            assert (meta["height"], meta["width"]) == rgb.shape[:2] == stored.shape


def test_rerun_writes_nothing(coco_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    _convert(coco_root, out)
    before = _file_states(out)
    summary = _convert(coco_root, out)
    assert _file_states(out) == before
    assert summary["shards_written"] == 4  # the summary of the run that wrote them


def test_interrupted_shard_is_rewritten(coco_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    _convert(coco_root, out)
    shard = out / "train-000001.tar"
    original = shard.read_bytes()
    shard.unlink()  # an interrupted run: temporary file left behind, never renamed
    (out / ".train-000001.tar.tmp").write_bytes(original[: len(original) // 3])
    summary = _convert(coco_root, out)
    assert summary["shards_written"] == 1 and summary["shards_reused"] == 3
    assert shard.read_bytes() == original
    assert not list(out.glob(".*.tmp"))


def test_parallel_workers_give_identical_shards(coco_root: Path, tmp_path: Path) -> None:
    _convert(coco_root, tmp_path / "one", workers=1)
    _convert(coco_root, tmp_path / "two", workers=2)
    for shard in (tmp_path / "one").glob("*.tar"):
        assert shard.read_bytes() == (tmp_path / "two" / shard.name).read_bytes()


def test_other_settings_in_same_out_is_an_error(coco_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    _convert(coco_root, out)
    with pytest.raises(ValueError, match="overwrite"):
        _convert(coco_root, out, options=coco.CannyOptions(canny_low=50))
    summary = _convert(coco_root, out, options=coco.CannyOptions(canny_low=50), overwrite=True)
    assert summary["settings"]["canny_low"] == 50 and summary["shards_written"] == 4


def test_max_samples_and_cli(coco_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    summary = coco.main(
        [
            "--images",
            str(coco_root / "train2017"),
            "--captions",
            str(coco_root / "annotations" / "captions_train2017.json"),
            "--out",
            str(out),
            "--max-samples",
            "4",
            "--val-fraction",
            "0.25",
            "--resolution",
            "16",
        ]
    )
    assert summary["written"] + summary["skipped_total"] - summary["skipped"]["no_captions"] == 4
    assert '"written"' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        coco.main(["--help"])
    assert "--val-fraction" in capsys.readouterr().out


def test_split_plan_is_deterministic_and_exact() -> None:
    items = [SourceItem(str(i)) for i in range(100)]
    plans = plan_shards(items, val_fraction=0.1, shard_size=30)
    again = plan_shards(list(reversed(items)), val_fraction=0.1, shard_size=30)
    assert plans == again
    assert [(p.name, len(p.items)) for p in plans] == [
        ("train-000000.tar", 30),
        ("train-000001.tar", 30),
        ("train-000002.tar", 30),
        ("val-000000.tar", 10),
    ]

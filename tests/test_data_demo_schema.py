"""Offline demo builder and the shard schema's encode/decode rules."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep import demo, demo_photos
from src.data import schema
from src.toy.world import parse_caption


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _states(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_ino) for p in directory.rglob("*")}


def test_build_demo_offline_and_idempotent(tmp_path: Path, no_network: None) -> None:
    start = time.monotonic()
    out = demo.build_demo("canny", tmp_path)
    assert time.monotonic() - start < 30
    assert out == tmp_path / "canny"
    assert sorted(p.name for p in out.glob("val-*.tar")) == ["val-000000.tar"]
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["splits"]["train"]["samples"] == demo.TOY_TRAIN
        and summary["splits"]["val"]["samples"] == demo.TOY_VAL
    )
    assert summary["skipped_total"] == 0 and summary["settings"]["resolution"] == demo.DEMO_RESOLUTION
    captions = json.loads((tmp_path / "coco" / "annotations" / "captions_train2017.json").read_text())
    assert len(captions["images"]) == len(captions["annotations"]) == demo.TOY_TRAIN + demo.TOY_VAL
    for ann in captions["annotations"]:  # every caption follows the toy grammar
        assert 1 <= len(parse_caption(ann["caption"])) <= 2
    before = _states(tmp_path / "coco") | _states(out)
    start = time.monotonic()
    assert demo.build_demo("canny", tmp_path) == out
    assert time.monotonic() - start < 2
    assert _states(tmp_path / "coco") | _states(out) == before


def test_demo_photos_are_read_from_the_package_folder(no_network: None) -> None:
    for name in demo_photos.PHOTOS:
        rgb = demo_photos.skimage_photo(name)
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and min(rgb.shape[:2]) >= 128


def test_unknown_demo_task_lists_supported(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"supported: \['canny'"):
        demo.build_demo("depth", tmp_path)


# ------------------------------------------------------------------------------------ schema
@pytest.mark.parametrize("key", ["coco2017_391895", "a-b_C9"])
def test_valid_keys(key: str) -> None:
    assert schema.check_key(key) == key


@pytest.mark.parametrize("key", ["a.b", "", "x/y", "space here"])
def test_invalid_keys(key: str) -> None:
    with pytest.raises(ValueError, match="no dots"):
        schema.check_key(key)


def test_make_key_replaces_dots_and_slashes() -> None:
    assert schema.make_key("faces", "celeba/00012.jpg") == "faces_celeba_00012_jpg"


def test_member_round_trips() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)
    gray = (rng.random((12, 10)) > 0.5).astype(np.uint8) * 255
    labels = rng.integers(0, 151, (12, 10), dtype=np.uint8)
    for member, value in (
        (schema.SEG, rgb),
        (schema.LANDMARKS, rgb),
        (schema.CANNY, gray),
        (schema.SEGLABEL, labels),
        (schema.SEGLABEL, labels.astype(np.uint16) * 300),
    ):
        np.testing.assert_array_equal(
            schema.decode_member(member, schema.encode_member(member, value)), value
        )
    jpg = schema.decode_member(schema.IMAGE, schema.encode_member(schema.IMAGE, rgb))
    assert jpg.shape == rgb.shape and jpg.dtype == np.uint8
    assert schema.decode_member(schema.CAPTION, schema.encode_member(schema.CAPTION, "café ☕")) == "café ☕"
    meta = {"source": "x", "width": 10, "captions": ["a", "b"]}
    assert schema.decode_member(schema.META, schema.encode_member(schema.META, meta)) == meta


def test_encode_rejects_wrong_arrays_and_unknown_members() -> None:
    with pytest.raises(ValueError, match="channel"):
        schema.encode_member(schema.CANNY, np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        schema.encode_member(schema.IMAGE, np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="not a schema member"):
        schema.encode_member("pyd", b"")


def test_decode_errors_are_sample_errors_with_reasons() -> None:
    with pytest.raises(schema.SampleError) as info:
        schema.decode_member(schema.IMAGE, b"garbage")
    assert info.value.reason == "undecodable_image"
    with pytest.raises(schema.SampleError) as info:
        schema.decode_member(schema.META, b"{not json")
    assert info.value.reason == "undecodable_json"


def test_conditions_and_known_members() -> None:
    assert schema.condition_spec("canny") == schema.ConditionSpec("canny.png", 1, "area")
    assert (
        schema.condition_spec("seg").interpolation
        == schema.condition_spec("landmarks").interpolation
        == "nearest"
    )
    assert schema.is_known_member("k.canny.png") and schema.is_known_member("dir/k.JPG")
    assert not schema.is_known_member("k.pyd") and not schema.is_known_member("k.pickle")
    with pytest.raises(ValueError, match="supported"):
        schema.condition_spec("depth")

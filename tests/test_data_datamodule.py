"""ShardDataModule round trips on the demo shards and on hand-made shards with bad samples."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import RES, PickleTrap, good_members, make_datamodule, read_shards, write_shard

from data_prep import demo
from data_prep.demo import build_demo
from src.data import schema
from src.data.datamodule import ShardDataModule
from src.data.pipeline import resolve_shards, to_model_inputs


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo("canny", tmp_path_factory.mktemp("demo"))


def _split_samples(directory: Path, split: str) -> dict[str, dict[str, bytes]]:
    return read_shards(directory, f"{split}-*.tar")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_val_round_trip_every_sample_once(demo_dir: Path, num_workers: int) -> None:
    expected = _split_samples(demo_dir, "val")
    dm = make_datamodule(demo_dir / "train-*.tar", str(demo_dir / "val-*.tar"), num_workers=num_workers)
    batches = list(dm.val_dataloader())
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(expected) and len(keys) == len(set(keys)) == demo.TOY_VAL
    for raw in batches:  # the loader yields uint8; the model's floats come from to_model_inputs
        n = len(raw["key"])
        assert raw["image"].shape == (n, 3, RES, RES) and raw["condition"].shape == (n, 1, RES, RES)
        assert raw["image"].dtype == raw["condition"].dtype == torch.uint8
        batch = to_model_inputs(raw)
        assert batch["image"].shape == batch["condition"].shape == (n, 3, RES, RES)
        assert batch["image"].dtype == batch["condition"].dtype == torch.float32
        assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
        assert batch["condition"].min() >= 0.0 and batch["condition"].max() <= 1.0
        for i, key in enumerate(batch["key"]):
            assert batch["caption"][i] == expected[key]["txt"].decode("utf-8")
            canny = cv2.imdecode(np.frombuffer(expected[key]["canny.png"], np.uint8), cv2.IMREAD_GRAYSCALE)
            np.testing.assert_array_equal(raw["condition"][i, 0].numpy(), canny)
            for channel in range(3):  # single channel replicated, values exactly k/255
                np.testing.assert_array_equal((batch["condition"][i, channel] * 255).round().numpy(), canny)


def test_train_flip_and_crop_are_paired(demo_dir: Path) -> None:
    expected = _split_samples(demo_dir, "train")
    dm = make_datamodule(str(demo_dir / "train-*.tar"), random_flip=True)
    flips = set()
    for batch in dm.train_dataloader():
        for i, key in enumerate(batch["key"]):
            canny = cv2.imdecode(np.frombuffer(expected[key]["canny.png"], np.uint8), cv2.IMREAD_GRAYSCALE)
            image = schema.decode_member("jpg", expected[key]["jpg"])
            cond = batch["condition"][i, 0].numpy()
            got = batch["image"][i].permute(1, 2, 0).numpy()
            flipped = not np.array_equal(cond, canny)
            if flipped:
                canny, image = canny[:, ::-1], image[:, ::-1]
            np.testing.assert_array_equal(cond, canny)
            np.testing.assert_array_equal(got, image)
            flips.add(flipped)
    assert flips == {True, False}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resampled_epoch_has_exact_batch_count(demo_dir: Path, num_workers: int) -> None:
    dm = make_datamodule(
        demo_dir, resampled=True, epoch_samples=40, batch_size=4, num_workers=num_workers, resolution=32
    )
    assert dm.batches_per_epoch() == 10
    for _ in range(2):
        batches = list(dm.train_dataloader())
        assert len(batches) == 10 and all(b["image"].shape == (4, 3, 32, 32) for b in batches)


def test_non_resampled_train_is_one_pass(demo_dir: Path) -> None:
    dm = make_datamodule(str(demo_dir / "train-*.tar"), batch_size=4, num_workers=2)
    keys = [k for b in dm.train_dataloader() for k in b["key"]]
    assert sorted(keys) == sorted(_split_samples(demo_dir, "train"))


def test_prepare_builds_before_setup_resolves(tmp_path: Path) -> None:
    root = tmp_path / "lazy"
    dm = ShardDataModule(
        str(root / "canny" / "train-*.tar"),
        str(root / "canny" / "val-*.tar"),
        resolution=32,
        prepare=lambda: build_demo("canny", root),
    )
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_urls) == 4 and len(dm.val_urls) == 1


# ------------------------------------------------------------------------------ spec resolution
def test_resolve_shards_forms(demo_dir: Path) -> None:
    train = [str(demo_dir / f"train-00000{i}.tar") for i in range(4)]
    every = sorted(str(p) for p in demo_dir.glob("*.tar"))
    assert resolve_shards(str(demo_dir / "train-{000000..000003}.tar")) == train
    assert resolve_shards(str(demo_dir / "train-*.tar")) == train
    assert resolve_shards(str(demo_dir)) == every
    assert resolve_shards([train[1], str(demo_dir / "val-*.tar")]) == [train[1], every[-1]]
    assert resolve_shards("pipe:curl -s http://host/x-{0..3}.tar") == [
        "pipe:curl -s http://host/x-{0..3}.tar"
    ]


def test_relative_specs_resolve_against_root(demo_dir: Path) -> None:
    assert resolve_shards("val-*.tar", root=str(demo_dir)) == [str(demo_dir / "val-000000.tar")]
    absolute = str(demo_dir / "train-000000.tar")
    assert resolve_shards(absolute, root="/elsewhere") == [absolute]
    dm = make_datamodule("train-*.tar", "val-000000.tar", root=str(demo_dir))
    assert len(dm.train_urls) == 4 and len(dm.val_urls) == 1


@pytest.mark.parametrize("spec", ["nowhere/train-*.tar", "nowhere/train-{000000..000002}.tar", "nowhere"])
def test_resolve_shards_no_match_names_spec_and_fix(spec: str) -> None:
    with pytest.raises(ValueError, match="data.train_shards") as info:
        resolve_shards(spec, "data.train_shards")
    assert spec in str(info.value) and "Build shards with a converter (README, 'Prepare your data'" in str(
        info.value
    )


def test_constructor_rejects_bad_values(demo_dir: Path) -> None:
    with pytest.raises(ValueError, match="supported"):
        ShardDataModule(str(demo_dir), condition="depth")
    with pytest.raises(ValueError, match="epoch_samples"):
        ShardDataModule(str(demo_dir), resampled=True)


# ---------------------------------------------------------------------- bad samples and pickles
def test_pickles_are_never_loaded_and_bad_samples_are_counted(tmp_path: Path) -> None:
    trap = tmp_path / "unpickled"
    payload = pickle.dumps(PickleTrap(str(trap)))
    pickle.loads(payload)  # the trap works...
    assert trap.exists()
    trap.unlink()  # ...and is reset before reading shards
    good = good_members(0)
    samples = {
        "good": {**good, "pyd": payload, "pickle": payload},
        "nocanny": {k: v for k, v in good_members(1).items() if k != "canny.png"},
        "badjpg": {**good_members(2), "jpg": b"\xff\xd8 not really a jpeg \xff\xd9"},
        "onlypickle": {"pyd": payload},
    }
    write_shard(tmp_path / "bad-000000.tar", samples)
    dm = make_datamodule(str(tmp_path / "bad-000000.tar"), str(tmp_path / "bad-000000.tar"))
    keys = [k for b in dm.val_dataloader() for k in b["key"]] + [
        k for b in dm.train_dataloader() for k in b["key"]
    ]
    assert keys == ["good"]  # the train batch of 4 is incomplete, so it is dropped
    assert not trap.exists()
    # "onlypickle" has no schema member at all: its files are never read, so it is no sample either
    assert dm.val_skips.counts == {"missing_canny.png": 1, "undecodable_image": 1}
    assert dm.val_skips.notes == {"unexpected_member": 3}  # good.pyd, good.pickle, onlypickle.pyd: unread
    assert not os.path.exists(trap)


def test_truncated_shard_is_counted_and_other_shards_still_read(tmp_path: Path) -> None:
    write_shard(tmp_path / "ok-000000.tar", {f"k{i}": good_members(i) for i in range(3)})
    write_shard(tmp_path / "ok-000001.tar", {f"t{i}": good_members(10 + i) for i in range(3)})
    data = (tmp_path / "ok-000001.tar").read_bytes()
    (tmp_path / "ok-000001.tar").write_bytes(data[: len(data) // 2 + 100])
    dm = make_datamodule(str(tmp_path / "ok-*.tar"), str(tmp_path / "ok-*.tar"))
    keys = [k for b in dm.val_dataloader() for k in b["key"]]
    assert keys[:3] == ["k0", "k1", "k2"] and set(keys) < {"k0", "k1", "k2", "t0", "t1", "t2"}
    assert dm.val_skips.counts["shard_read_error"] >= 1  # webdataset may report one broken tar twice

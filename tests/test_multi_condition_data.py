"""Joint multi-condition data (``canny+seg``): names, decoding, batches, the ADE20K converter's canny and the demo.

A multi condition stacks one 3-channel block per name, in the order of the names, and every batch says in
``present`` which members a sample had; single-condition batches stay as they were (no ``present``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from helpers import read_shards
from PIL import Image

from data_prep import ade20k as ade_prep
from data_prep import demo
from data_prep.images import load_rgb
from src.data import palette, schema
from src.data.annotators import canny_edges
from src.data.datamodule import ShardDataModule
from src.data.health import COUNTS_KEY, SkipCounter
from src.data.pipeline import DecodeBatches, SampleDecoder, collate, eval_pipeline, to_model_inputs
from src.data.transforms import hflip, resize_center_crop
from src.errors import ConfigError

RES = 32


# ------------------------------------------------------------------------------------------ samples
def _scene(index: int, height: int = 40, width: int = 52) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image with shapes (edges to find) and its block label map."""
    rng = np.random.default_rng(index)
    rgb = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    cv2.circle(rgb, (width // 3, height // 2), height // 4, (230, 30, 30), -1)
    cv2.rectangle(rgb, (width // 2, 3), (width - 4, height // 2), (20, 200, 160), -1)
    blocks = rng.integers(1, palette.N_CLASSES + 1, (4, 4)).astype(np.uint8)
    labels = cv2.resize(blocks, (width, height), interpolation=cv2.INTER_NEAREST)
    return rgb, labels


def _sample(
    index: int, members: tuple[str, ...] = (schema.CANNY, schema.SEG), **shape: int
) -> dict[str, Any]:
    """Raw sample (member bytes, as the shard reader yields it) with the given condition members."""
    rgb, labels = _scene(index, **shape)
    conditions = {schema.CANNY: canny_edges(rgb), schema.SEG: palette.colorize(labels)}
    sample = {
        "__key__": f"k{index}",
        schema.IMAGE: schema.encode_member(schema.IMAGE, rgb),
        schema.CAPTION: f"caption {index}".encode(),
    }
    for member in members:
        sample[member] = schema.encode_member(member, conditions[member])
    return sample


def _decoders(train: bool, seed: int = 0, flip: bool = True) -> tuple[SampleDecoder, ...]:
    return tuple(SampleDecoder(c, RES, train, flip, seed) for c in ("canny+seg", "canny", "seg"))


def _batches(decoder: SampleDecoder, samples: list[dict[str, Any]], batch_size: int = 4):
    skips = SkipCounter("test")
    batches = list(skips.attach(DecodeBatches(decoder, batch_size, partial=True, skips=skips)(samples)))
    return batches, skips


# ------------------------------------------------------------------------------------------- names
def test_condition_names_split_in_order() -> None:
    assert schema.condition_names("canny") == ["canny"]
    assert schema.condition_names("canny+seg") == ["canny", "seg"]
    assert schema.condition_names("seg+canny") == ["seg", "canny"]
    assert schema.condition_names("canny+seg+landmarks") == ["canny", "seg", "landmarks"]


@pytest.mark.parametrize(
    "condition,named",
    [
        ("depth", "'depth'"),
        ("canny+depth", "'depth'"),
        ("canny+canny", "'canny'"),
        ("", "''"),
        ("canny+", "'canny+'"),
        ("+seg", "'+seg'"),
        ("canny++seg", "'canny++seg'"),
    ],
    ids=["unknown", "unknown-member", "duplicate", "empty", "trailing", "leading", "double"],
)
def test_condition_names_errors_are_one_line_naming_the_value(condition: str, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        schema.condition_names(condition)
    message = str(info.value)
    assert "\n" not in message and named in message
    assert "supported: ['canny', 'landmarks', 'seg']" in message


def test_datamodule_refuses_a_bad_multi_condition(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'canny' more than once"):
        ShardDataModule(str(tmp_path / "x-*.tar"), condition="canny+canny")


# ----------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_two_members_stack_the_single_decoders_crops(train: bool) -> None:
    mirrored = []
    for seed in range(8):  # a fresh decoder per seed: the same draws (crop, then flip) for all three
        multi, canny, seg = _decoders(train, seed)
        sample = _sample(seed)
        out, ref_canny, ref_seg = multi(sample), canny(sample), seg(sample)
        assert out["condition"].shape == (6, RES, RES) and out["condition"].dtype == torch.uint8
        assert ref_canny["condition"].shape == (1, RES, RES)
        torch.testing.assert_close(out["condition"][:3], ref_canny["condition"].expand(3, RES, RES))
        torch.testing.assert_close(out["condition"][3:], ref_seg["condition"])
        torch.testing.assert_close(out["image"], ref_canny["image"])
        assert out["present"].tolist() == [True, True] and out["present"].dtype == torch.bool
        assert "present" not in ref_canny and "present" not in ref_seg
        mirrored.append(_decoders(train, seed)[0].crops_present(sample)[3])
    assert any(mirrored) == train and (not train or not all(mirrored))


def test_a_mirrored_sample_mirrors_every_condition() -> None:
    seen = set()
    for seed in range(8):
        sample = _sample(seed)
        still = SampleDecoder("canny+seg", RES, True, True, seed)
        image, cond, _, mirror, _ = still.crops_present(sample)
        out = SampleDecoder("canny+seg", RES, True, True, seed)(sample)
        flip = hflip if mirror else np.ascontiguousarray
        np.testing.assert_array_equal(out["image"].permute(1, 2, 0).numpy(), flip(image))
        for block in range(2):  # canny, then seg: both mirrored with the image, or neither
            got = out["condition"][3 * block : 3 * block + 3].permute(1, 2, 0).numpy()
            np.testing.assert_array_equal(
                got, flip(np.ascontiguousarray(cond[..., 3 * block : 3 * block + 3]))
            )
        seen.add(mirror)
    assert seen == {True, False}


def test_no_flip_when_one_condition_is_not_flippable() -> None:
    decoder = SampleDecoder("canny+landmarks", RES, True, True, 0)
    assert not decoder.flippable
    sample = _sample(0)
    sample[schema.LANDMARKS] = sample.pop(schema.SEG)  # an RGB rendering stands in for landmarks
    assert not any(decoder.crops_present(sample)[3] for _ in range(16))


def test_a_missing_member_is_zeros_and_not_present() -> None:
    multi, canny, seg = _decoders(False)
    out = multi(_sample(0, (schema.CANNY,)))
    assert out["present"].tolist() == [True, False]
    torch.testing.assert_close(out["condition"][:3], canny(_sample(0))["condition"].expand(3, RES, RES))
    assert int(out["condition"][3:].count_nonzero()) == 0
    out = multi(_sample(0, (schema.SEG,)))
    assert out["present"].tolist() == [False, True]
    assert int(out["condition"][:3].count_nonzero()) == 0
    torch.testing.assert_close(out["condition"][3:], seg(_sample(0))["condition"])


def test_batches_carry_present_skip_samples_without_conditions_and_note_partial_ones() -> None:
    samples = [
        _sample(0),
        _sample(1, (schema.CANNY,)),
        _sample(2, ()),  # neither condition: skipped
        _sample(3, (schema.SEG,)),
        _sample(4),
        _sample(5, (schema.CANNY, schema.SEG), height=40, width=52),
    ]
    samples[5][schema.SEG] = schema.encode_member(
        schema.SEG, np.zeros((30, 30, 3), np.uint8)
    )  # size_mismatch
    multi = SampleDecoder("canny+seg", RES, False, False, 0)
    batches, skips = _batches(multi, samples, batch_size=2)
    assert [b["key"] for b in batches] == [["k0", "k1"], ["k3", "k4"]]
    assert skips.counts == {"missing_condition": 1, "size_mismatch": 1}
    assert skips.notes == {"partial_condition": 2}
    counts = [b[COUNTS_KEY] for b in batches]
    assert sum(c.get("skipped/missing_condition", 0) for c in counts) == 1
    assert sum(c.get("noted/partial_condition", 0) for c in counts) == 2
    present = torch.cat([b["present"] for b in batches])
    assert present.dtype == torch.bool and present.tolist() == [
        [True, True],
        [True, False],
        [False, True],
    ] + [[True, True]]
    kept = [samples[i] for i in (0, 1, 3, 4)]
    reference = collate([multi(s) for s in kept])
    got = torch.cat([b["condition"] for b in batches])
    assert got.shape == (4, 6, RES, RES) and got.dtype == torch.uint8
    assert torch.equal(got, reference["condition"]) and torch.equal(present, reference["present"])
    assert torch.equal(torch.cat([b["image"] for b in batches]), reference["image"])
    assert got.permute(0, 2, 3, 1).is_contiguous()  # stored channels-last, as single-condition batches


def test_a_single_condition_batch_has_no_present_and_a_missing_member_is_skipped() -> None:
    _, canny, _ = _decoders(False)
    batches, skips = _batches(canny, [_sample(0), _sample(1, (schema.SEG,))])
    assert [b["key"] for b in batches] == [["k0"]] and "present" not in batches[0]
    assert skips.counts == {"missing_canny.png": 1} and not skips.notes
    assert "present" not in collate([canny(_sample(0))])


def test_model_inputs_of_a_multi_batch_are_the_float_levels() -> None:
    multi = SampleDecoder("canny+seg", RES, True, True, 0)
    batches, _ = _batches(
        multi, [_sample(i, (schema.CANNY,) if i == 1 else (schema.CANNY, schema.SEG)) for i in range(3)]
    )
    batch = batches[0]
    inputs = to_model_inputs(batch)
    assert inputs["condition"].shape == (3, 6, RES, RES) and inputs["condition"].dtype == torch.float32
    torch.testing.assert_close(inputs["condition"], batch["condition"].float() / 255.0, rtol=0, atol=0)
    assert inputs["present"] is batch["present"] and inputs["condition"].is_contiguous()
    sample = to_model_inputs(multi(_sample(0)))
    assert sample["condition"].shape == (6, RES, RES)


def test_model_inputs_check_the_channels_of_either_kind() -> None:
    multi, canny, _ = _decoders(False)
    batch = collate([multi(_sample(0)), multi(_sample(1))])
    with pytest.raises(ValueError, match=r"expected \[\.\.\., 6, H, W\]"):
        to_model_inputs({**batch, "condition": batch["condition"][:, :3]})
    with pytest.raises(ValueError, match=r"expected \[\.\.\., 6, H, W\]"):
        to_model_inputs({**batch, "condition": batch["condition"][:, :1]})
    single = collate([canny(_sample(0))])
    assert to_model_inputs(single)["condition"].shape == (1, 3, RES, RES)
    with pytest.raises(ValueError, match=r"expected \[\.\.\., 1 or 3, H, W\]"):
        to_model_inputs({**single, "condition": batch["condition"]})  # 6 channels without present


# ------------------------------------------------------------------------------------------- ADE20K
@pytest.fixture
def ade_root(tmp_path: Path) -> Path:
    """ADEChallengeData2016 layout: three training images and one validation image, 40 x 52."""
    root = tmp_path / "ADEChallengeData2016"
    for index, (folder, name) in enumerate(
        [("training", f"ADE_train_{i:08d}") for i in range(1, 4)] + [("validation", "ADE_val_00000001")]
    ):
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        rgb, labels = _scene(index)
        Image.fromarray(rgb).save(root / "images" / folder / f"{name}.jpg", quality=95)
        Image.fromarray(labels, mode="L").save(root / "annotations" / folder / f"{name}.png")
    return root


def _png(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


@pytest.mark.parametrize("resolution", [None, 24])
def test_ade20k_with_canny_writes_the_canny_of_the_stored_image(
    ade_root: Path, tmp_path: Path, resolution: int | None
) -> None:
    plain = ade_prep.convert(ade_root, tmp_path / "seg", options=ade_prep.SegOptions(resolution=resolution))
    both = ade_prep.convert(
        ade_root, tmp_path / "both", options=ade_prep.SegOptions(resolution=resolution, canny=True)
    )
    assert "canny" not in plain["settings"]  # segmentation-only shards keep their fingerprint
    assert both["settings"]["canny"] is True and both["settings"]["canny_low"] == 100
    seg_samples, samples = read_shards(tmp_path / "seg"), read_shards(tmp_path / "both")
    assert samples.keys() == seg_samples.keys() and len(samples) == 4
    for key, members in samples.items():
        assert set(members) == {"jpg", "txt", "json", "seg.png", "seglabel.png", "canny.png"}
        schema.check_members(tuple(members))
        folder = "validation" if "_val_" in key else "training"
        rgb = load_rgb(ade_root / "images" / folder / f"{key.removeprefix('ade20k_')}.jpg")
        if resolution is not None:
            rgb = resize_center_crop(rgb, resolution)
        reference = cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), 100, 200)  # cv2 itself, not ours
        assert reference.any()
        np.testing.assert_array_equal(_png(members["canny.png"]), reference)
        for member in ("seg.png", "seglabel.png", "jpg", "txt"):  # the other members are unchanged
            assert members[member] == seg_samples[key][member]
        assert json.loads(members["json"])["canny"] == {"low": 100, "high": 200, "on": "gray"}
        assert "canny" not in json.loads(seg_samples[key]["json"])


def test_ade20k_cli_canny_flag(ade_root: Path, tmp_path: Path) -> None:
    ade_prep.main(
        ["--root", str(ade_root), "--out", str(tmp_path / "both"), "--canny", "--canny-high", "150"]
    )
    summary = json.loads((tmp_path / "both" / "summary.json").read_text())
    assert summary["settings"]["canny"] is True and summary["settings"]["canny_high"] == 150
    assert all("canny.png" in m for m in read_shards(tmp_path / "both").values())


# --------------------------------------------------------------------------------------------- demo
def test_canny_seg_demo_reads_as_six_channel_batches(tmp_path: Path) -> None:
    out = demo.build_demo("canny+seg", tmp_path, train_scenes=8, val_scenes=4, shard_size=4)
    assert out == tmp_path / "canny+seg"
    assert sorted(p.name for p in out.glob("*.tar")) == [
        "train-000000.tar",
        "train-000001.tar",
        "val-000000.tar",
    ]
    samples = read_shards(out)
    assert len(samples) == 12
    for members in samples.values():
        assert {"jpg", "txt", "canny.png", "seg.png"} <= set(members)
    dm = ShardDataModule(
        str(out / "train-*.tar"),
        str(out / "val-*.tar"),
        condition="canny+seg",
        resolution=demo.DEMO_RESOLUTION,
        batch_size=4,
        val_batch_size=4,
        shuffle_buffer=4,
    )
    dm.setup("fit")
    for loader, count in ((dm.val_dataloader(), 1), (dm.train_dataloader(), 2)):
        batches = [dm.on_after_batch_transfer(batch, 0) for batch in loader]
        assert len(batches) == count
        for batch in batches:
            assert batch["condition"].shape == (4, 6, demo.DEMO_RESOLUTION, demo.DEMO_RESOLUTION)
            assert batch["present"].shape == (4, 2) and bool(batch["present"].all())
            assert not batch[COUNTS_KEY].get("noted/partial_condition")
            assert batch["condition"][:, :3].sum() > 0 and batch["condition"][:, 3:].sum() > 0
            canny = batch["condition"][:, :3]
            assert torch.equal(canny[:, 0], canny[:, 1]) and torch.equal(canny[:, 0], canny[:, 2])
    skips = SkipCounter("val")
    decoder = SampleDecoder("canny+seg", demo.DEMO_RESOLUTION, False, False, 0)
    (batch,) = list(
        eval_pipeline(sorted(map(str, out.glob("val-*.tar"))), decoder, batch_size=8, skips=skips)
    )
    assert batch["condition"].shape == (4, 6, demo.DEMO_RESOLUTION, demo.DEMO_RESOLUTION) and not skips.counts


def test_canny_seg_demo_shares_the_seg_layout_and_stays_consistent(tmp_path: Path) -> None:
    small = dict(train_scenes=8, val_scenes=4, shard_size=4)
    seg = demo.build_demo("seg", tmp_path, **small)
    layout = tmp_path / "ADEChallengeData2016"
    before = {p: p.stat().st_mtime_ns for p in layout.rglob("*")}
    demo.build_demo("canny+seg", tmp_path, **small)
    assert {p: p.stat().st_mtime_ns for p in layout.rglob("*")} == before  # one layout for both tasks
    assert read_shards(seg).keys() == read_shards(tmp_path / "canny+seg").keys()
    # another size rewrites the shared layout: the seg shards made from the old one are rebuilt next time
    demo.build_demo("canny+seg", tmp_path, train_scenes=6, val_scenes=2, shard_size=4)
    assert (seg / demo.STALE).exists()
    demo.build_demo("seg", tmp_path, train_scenes=6, val_scenes=2, shard_size=4)
    summary = json.loads((seg / "summary.json").read_text())
    assert (summary["splits"]["train"]["samples"], summary["splits"]["val"]["samples"]) == (6, 2)
    assert not (seg / demo.STALE).exists()
    for members in read_shards(seg).values():
        assert "canny.png" not in members
    done = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if ".lock" not in p.name}
    demo.build_demo("seg", tmp_path, train_scenes=6, val_scenes=2, shard_size=4)
    demo.build_demo("canny+seg", tmp_path, train_scenes=6, val_scenes=2, shard_size=4)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if ".lock" not in p.name} == done

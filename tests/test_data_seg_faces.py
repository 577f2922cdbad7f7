"""ADE20K and face-folder converters, their demos, and reading seg/landmarks through the datamodule."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import read_shards, write_shard
from PIL import Image

from data_prep import ade20k as ade_prep
from data_prep import demo, faces
from data_prep.assets import skimage_photo
from data_prep.demo_faces import face_variant
from src.data import palette, schema
from src.data.datamodule import ShardDataModule
from src.data.pipeline import to_model_inputs

# importing controlnet-aux registers timm models twice and says so; that is not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:Overwriting .* in registry:UserWarning")


def _png(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


# ------------------------------------------------------------------------------------- ADE20K
def _labels(seed: int, height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 151, (4, 4)).astype(np.uint8)
    return cv2.resize(blocks, (width, height), interpolation=cv2.INTER_NEAREST)


@pytest.fixture
def ade_root(tmp_path: Path) -> Path:
    """ADEChallengeData2016 layout: 4 good training images, 2 validation, 3 broken, captions for one."""
    root = tmp_path / "ADEChallengeData2016"
    cases = [("training", f"ADE_train_{i:08d}", "ok") for i in range(1, 5)]
    cases += [("validation", f"ADE_val_{i:08d}", "ok") for i in range(1, 3)]
    cases += [
        ("training", "ADE_train_00000005", "no_annotation"),
        ("training", "ADE_train_00000006", "size"),
        ("training", "ADE_train_00000007", "range"),
    ]
    for index, (folder, name, case) in enumerate(cases):
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        rgb = np.random.default_rng(index).integers(0, 255, (40, 52, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(root / "images" / folder / f"{name}.jpg")
        labels = _labels(index, *(rgb.shape[:2] if case != "size" else (30, 30)))
        if case == "range":
            labels[0, 0] = 200
        if case != "no_annotation":
            Image.fromarray(labels, mode="L").save(root / "annotations" / folder / f"{name}.png")
    (tmp_path / "captions.json").write_text(json.dumps({"ADE_train_00000002": ["a captioned scene", "more"]}))
    return root


def test_ade20k_members_labels_palette_and_skips(ade_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "seg"
    summary = ade_prep.convert(ade_root, out, captions=tmp_path / "captions.json", shard_size=3)
    assert summary["skipped"] == {"label_out_of_range": 1, "missing_annotation": 1, "size_mismatch": 1}
    assert summary["splits"]["train"]["samples"] == 4 and summary["splits"]["val"]["samples"] == 2
    for members in read_shards(out).values():
        assert set(members) == {"jpg", "txt", "json", "seg.png", "seglabel.png"}
        meta = json.loads(members["json"])
        folder = meta["folder"]
        source = np.asarray(Image.open(ade_root / "annotations" / folder / f"{meta['source_id']}.png"))
        labels = _png(members["seglabel.png"])
        np.testing.assert_array_equal(labels, source)
        np.testing.assert_array_equal(_png(members["seg.png"])[..., ::-1], palette.colorize(labels))
        caption = members["txt"].decode()
        if meta["source_id"] == "ADE_train_00000002":
            assert caption == "a captioned scene" and meta["caption_source"] == "file"
        else:
            assert caption == palette.classes_caption(labels) and meta["caption_source"] == "classes"


def test_ade20k_resized_labels_stay_exact(ade_root: Path, tmp_path: Path) -> None:
    ade_prep.convert(ade_root, tmp_path / "seg", options=ade_prep.SegOptions(resolution=24))
    for members in read_shards(tmp_path / "seg").values():
        labels = _png(members["seglabel.png"])
        assert labels.shape == (24, 24)
        np.testing.assert_array_equal(_png(members["seg.png"])[..., ::-1], palette.colorize(labels))


def test_seg_condition_through_datamodule_keeps_palette_colours(ade_root: Path, tmp_path: Path) -> None:
    ade_prep.convert(ade_root, tmp_path / "seg")
    dm = ShardDataModule(
        str(tmp_path / "seg" / "train-*.tar"),
        str(tmp_path / "seg" / "val-*.tar"),
        condition="seg",
        resolution=16,
        batch_size=2,
        val_batch_size=2,
    )
    dm.setup()
    colours = {tuple(c) for c in palette.palette_lut().tolist()}
    for batch in list(dm.val_dataloader()) + list(dm.train_dataloader()):
        condition = to_model_inputs(batch)["condition"]  # the loader's uint8 as the model sees it
        pixels = (condition.permute(0, 2, 3, 1) * 255).round().int().reshape(-1, 3).tolist()
        assert {tuple(p) for p in pixels} <= colours  # nearest-neighbour: no blended colours


def test_classes_caption() -> None:
    labels = np.zeros((10, 10), np.uint8)
    labels[:6], labels[6:], labels[9, 9] = 3, 2, 7  # sky, building, one pixel of road
    assert palette.classes_caption(labels) == "a photo of sky, building and road"
    assert palette.classes_caption(labels, min_share=0.05) == "a photo of sky and building"
    assert palette.classes_caption(np.zeros((4, 4), np.uint8)) == "a photo"


# -------------------------------------------------------------------------------------- faces
@pytest.fixture
def faces_dir(tmp_path: Path) -> Path:
    """Three face crops (one captioned), one photo without a face, one corrupt file."""
    images = tmp_path / "faces"
    images.mkdir()
    photo = skimage_photo("astronaut.png")
    for index in range(3):
        Image.fromarray(face_variant(photo, index)[0]).save(images / f"face_{index}.jpg")
    Image.fromarray(skimage_photo("coffee.png")[::4, ::4]).save(images / "cup.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "captions").mkdir()
    (tmp_path / "captions" / "face_1.txt").write_text("a smiling woman\n\na second caption\n")
    return images


def test_faces_members_points_and_skips(faces_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "landmarks"
    summary = faces.convert(
        faces_dir,
        out,
        captions=tmp_path / "captions",
        val_fraction=0.0,
        options=faces.FaceOptions(resolution=64),
    )
    assert summary["written"] == 3 and summary["skipped"] == {"no_face": 1, "unreadable_image": 1}
    for key, members in read_shards(out).items():
        assert set(members) == {"jpg", "txt", "json", "landmarks.png", "landmarks.json"}
        points = np.asarray(json.loads(members["landmarks.json"])["faces"][0])
        assert points.shape == (478, 2) and (points >= 0).all() and (points <= 64).all()
        drawing = _png(members["landmarks.png"])
        assert drawing.shape == (64, 64, 3) and drawing.any()
        ys, xs = np.nonzero(drawing.max(axis=2) > 40)
        assert xs.min() >= points[:, 0].min() - 3 and xs.max() <= points[:, 0].max() + 3
        expected = "a smiling woman" if key == "faces_face_1" else "a photo of a face"
        assert members["txt"].decode() == expected


def test_face_drawing_matches_controlnet_aux_and_palette_matches(faces_dir: Path) -> None:
    from controlnet_aux.mediapipe_face.mediapipe_face_common import generate_annotation
    from controlnet_aux.util import ade_palette

    rgb = skimage_photo("astronaut.png")
    ours = faces.render_faces(rgb.shape, faces.detect_faces(rgb))
    np.testing.assert_array_equal(ours, generate_annotation(rgb, 1, 0.5))
    assert [list(c) for c in palette.ADE20K_PALETTE] == ade_palette()


def test_landmarks_are_never_flipped(tmp_path: Path) -> None:
    members = {
        "jpg": schema.encode_member("jpg", np.zeros((16, 16, 3), np.uint8)),
        "txt": b"x",
        "json": b"{}",
    }
    drawing = np.zeros((16, 16, 3), np.uint8)
    drawing[:, :4] = (10, 200, 250)  # something on the left only
    members["landmarks.png"] = schema.encode_member("landmarks.png", drawing)
    write_shard(tmp_path / "f-000000.tar", {"k": members})
    dm = ShardDataModule(
        str(tmp_path / "f-000000.tar"),
        condition="landmarks",
        resolution=16,
        batch_size=1,
        random_flip=True,
        shuffle_buffer=1,
    )
    dm.setup()
    for _ in range(8):
        batch = next(iter(dm.train_dataloader()))
        assert batch["condition"][0, :, :, :4].min() > 0 and batch["condition"][0, :, :, 4:].max() == 0


# --------------------------------------------------------------------------------------- demos
@pytest.mark.parametrize(
    "task,skipped,counts",
    [("seg", {}, (demo.TOY_TRAIN, demo.TOY_VAL)), ("landmarks", {"no_face": 2}, (32, 8))],
)
def test_seg_and_landmarks_demos(tmp_path: Path, task: str, skipped: dict, counts: tuple[int, int]) -> None:
    out = demo.build_demo(task, tmp_path)
    assert out == tmp_path / task
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["splits"]["train"]["samples"], summary["splits"]["val"]["samples"]) == counts
    assert summary["skipped"] == skipped
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    demo.build_demo(task, tmp_path)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before

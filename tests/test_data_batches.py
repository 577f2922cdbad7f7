"""The uint8 batch contract: compact batches out of the workers, the reference float values after conversion.

``SampleDecoder``/``collate`` yield uint8 pixels; ``to_model_inputs`` (called by
``ShardDataModule.on_after_batch_transfer`` on the device) must give exactly the float32 values a
float reference decoder gives, for every condition, resize direction and flip, and Lightning must hand
the converted batch to the steps and to the callbacks' batch hooks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from data_prep.demo import build_demo
from src.data import schema
from src.data.datamodule import ShardDataModule
from src.data.health import COUNTS_KEY, SkipCounter
from src.data.pipeline import DecodeBatches, SampleDecoder, collate, process_seed, to_model_inputs
from src.data.transforms import center_offsets, crop, hflip, random_offsets, resize_shorter


# ------------------------------------------------------------------ the float reference
class ReferenceFloatDecoder:
    """Decode, resize, crop and flip, then convert to float32 on the spot (the reference values only)."""

    def __init__(self, condition: str, resolution: int, train: bool, random_flip: bool, seed: int) -> None:
        self.spec = schema.condition_spec(condition)
        self.resolution, self.train, self.random_flip = resolution, train, random_flip
        self.rng = np.random.default_rng(process_seed(seed, 0))
        self.mirrored: list[bool] = []  # the flip decision of every sample so far

    @staticmethod
    def decode(member: str, data: bytes) -> np.ndarray:
        flags = cv2.IMREAD_IGNORE_ORIENTATION
        if member == schema.CANNY:
            return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE | flags)
        return np.ascontiguousarray(
            cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | flags)[..., ::-1]
        )

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        size = self.resolution
        image = resize_shorter(self.decode(schema.IMAGE, sample[schema.IMAGE]), size)
        cond = resize_shorter(
            self.decode(self.spec.member, sample[self.spec.member]), size, self.spec.interpolation
        )
        rng = self.rng if self.train else None
        top, left = (
            random_offsets(*image.shape[:2], size, rng) if rng else center_offsets(*image.shape[:2], size)
        )
        image, cond = crop(image, top, left, size), crop(cond, top, left, size)
        self.mirrored.append(
            rng is not None and self.random_flip and self.spec.flippable and rng.random() < 0.5
        )
        if self.mirrored[-1]:
            image, cond = image[:, ::-1], cond[:, ::-1]
        if cond.ndim == 2:
            cond = np.repeat(cond[:, :, None], 3, axis=2)
        image_t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1.0
        cond_t = torch.from_numpy(np.ascontiguousarray(cond[:, :, :3])).permute(2, 0, 1).float() / 255.0
        return {"image": image_t, "condition": cond_t, "key": sample["__key__"]}


def _photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth gradients, shapes and noise: enough structure for edges and for interpolation to matter."""
    ys, xs = np.mgrid[0:height, 0:width]
    rgb = np.stack([xs * 255 // width, ys * 255 // height, (xs + ys) % 256], axis=2).astype(np.uint8)
    rgb = cv2.add(rgb, rng.integers(0, 40, rgb.shape, dtype=np.uint8))
    cv2.circle(rgb, (width // 3, height // 2), min(height, width) // 4, (230, 30, 30), -1)
    cv2.rectangle(rgb, (width // 2, 3), (width - 4, height // 2), (20, 20, 160), 2)
    return rgb


def _samples(condition: str, height: int, width: int, count: int = 6) -> list[dict[str, Any]]:
    """In-memory samples (member bytes) with the task's condition member, as tars hold them."""
    samples = []
    for index in range(count):
        rng = np.random.default_rng(index)
        rgb = _photo(rng, height, width)
        if condition == "canny":
            cond = cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), 100, 200)
        else:  # palette-like colour blocks, as seg maps and landmark renderings are
            cond = np.repeat(
                np.repeat(rng.integers(0, 255, (height // 4 + 1, width // 4 + 1, 3), np.uint8), 4, axis=0),
                4,
                axis=1,
            )[:height, :width]
        member = schema.condition_spec(condition).member
        samples.append(
            {
                "__key__": f"k{index}",
                schema.IMAGE: schema.encode_member(schema.IMAGE, rgb),
                schema.CAPTION: f"caption {index}".encode(),
                member: schema.encode_member(member, cond),
            }
        )
    return samples


# ------------------------------------------------------------------------------ bit identity
@pytest.mark.parametrize("member", [schema.IMAGE, schema.SEG, schema.LANDMARKS])
def test_rgb_members_decode_to_the_reversed_bgr_pixels(member: str) -> None:
    rgb = _photo(np.random.default_rng(0), 37, 53)
    data = schema.encode_member(member, rgb)
    decoded = schema.decode_member(member, data)
    assert decoded.dtype == np.uint8 and decoded.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(decoded, ReferenceFloatDecoder.decode(member, data))


@pytest.mark.parametrize("condition", ["canny", "seg", "landmarks"])
@pytest.mark.parametrize("size", [(80, 100), (100, 72), (40, 36)], ids=["shrink", "shrink-tall", "enlarge"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_converted_batches_equal_the_reference_float_batches(
    condition: str, size: tuple[int, int], train: bool
) -> None:
    """Same samples, same seed: ``to_model_inputs(collate(...))`` is bit-identical to the float pipeline,
    including area-interpolated canny values (48 px crops of 80-100 px images: non-integer scales)."""
    samples = _samples(condition, *size)
    new = SampleDecoder(condition, 48, train=train, random_flip=True, seed=3)
    old = ReferenceFloatDecoder(condition, 48, train=train, random_flip=True, seed=3)
    raw = collate([new(s) for s in samples])
    channels = 1 if condition == "canny" else 3
    assert raw["image"].dtype == raw["condition"].dtype == torch.uint8
    assert raw["image"].shape == (6, 3, 48, 48) and raw["condition"].shape == (6, channels, 48, 48)
    batch = to_model_inputs(raw)
    expected = [old(s) for s in samples]
    for name in ("image", "condition"):
        assert batch[name].dtype == torch.float32 and batch[name].is_contiguous()
        assert torch.equal(batch[name], torch.stack([e[name] for e in expected])), name
    assert batch["key"] == [e["key"] for e in expected] and batch["caption"] == raw["caption"]
    if condition == "canny" and size[0] > 48:
        assert 0 < ((batch["condition"] > 0) & (batch["condition"] < 1)).float().mean() < 0.5  # area blends


@pytest.mark.parametrize("condition", ["canny", "seg", "landmarks"])
@pytest.mark.parametrize("size", [(80, 100), (40, 36)], ids=["shrink", "enlarge"])
@pytest.mark.parametrize("partial", [True, False], ids=["partial", "drop-last"])
def test_the_pipelines_batches_equal_the_reference_and_collate(
    condition: str, size: tuple[int, int], partial: bool
) -> None:
    """``DecodeBatches`` (one copy per sample, the mirror in that copy) gives the reference float values
    after conversion and the very batches ``collate`` stacks from per-sample outputs, layout included."""
    samples = _samples(condition, *size, count=7)
    fused = DecodeBatches(SampleDecoder(condition, 48, True, True, seed=5), 3, partial, SkipCounter("t"))
    batches = list(fused(samples))
    decoder = SampleDecoder(condition, 48, True, True, seed=5)
    per_sample = [decoder(s) for s in samples]
    reference = ReferenceFloatDecoder(condition, 48, train=True, random_flip=True, seed=5)
    expected = [reference(s) for s in samples]
    assert [len(b["key"]) for b in batches] == ([3, 3, 1] if partial else [3, 3])
    for index, batch in enumerate(batches):
        span = slice(3 * index, 3 * index + len(batch["key"]))
        stacked = collate(per_sample[span])
        converted = to_model_inputs(batch)
        for name in ("image", "condition"):
            assert batch[name].dtype == torch.uint8 and batch[name].stride() == stacked[name].stride()
            assert torch.equal(batch[name], stacked[name]), name
            assert torch.equal(converted[name], torch.stack([e[name] for e in expected[span]])), name
        assert batch["key"] == [s["__key__"] for s in samples[span]]
        assert batch["caption"] == [s[schema.CAPTION].decode() for s in samples[span]]
    # the mirror is drawn (never for landmark renderings, whose sides are coloured)
    assert any(reference.mirrored) == (condition != "landmarks") and not all(reference.mirrored)


def test_a_bad_sample_between_good_ones_is_counted_and_leaves_no_hole() -> None:
    samples = _samples("canny", 48, 48, count=5)
    samples.insert(2, {**samples[0], "__key__": "bad", schema.IMAGE: b""})
    skips = SkipCounter("t")
    batches = list(DecodeBatches(SampleDecoder("canny", 48, False, False, 0), 2, True, skips)(samples))
    assert [b["key"] for b in batches] == [["k0", "k1"], ["k2", "k3"], ["k4"]]
    assert skips.counts == {"empty_member": 1}
    good = collate([SampleDecoder("canny", 48, False, False, 0)(s) for s in samples if s["__key__"] != "bad"])
    assert torch.equal(torch.cat([b["image"] for b in batches]), good["image"])


@pytest.mark.parametrize("shape", [(9, 7), (9, 7, 1), (9, 7, 3)])
def test_hflip_into_a_slot_equals_opencvs_mirror(shape: tuple[int, ...]) -> None:
    array = np.random.default_rng(0).integers(0, 256, (12, 10, *shape[2:]), np.uint8)[1:10, 2:9]
    out = np.zeros((2, *shape), np.uint8)
    assert np.shares_memory(hflip(array, out=out[1]), out)
    np.testing.assert_array_equal(out[1], array[:, ::-1])
    assert not out[0].any()
    with pytest.raises(ValueError, match="expected a contiguous"):
        hflip(array, out=np.zeros((9, 8, *shape[2:]), np.uint8))


def test_flips_happen_and_stay_paired() -> None:
    samples = _samples("canny", 48, 48, count=16)
    decoder = SampleDecoder("canny", 48, train=True, random_flip=True, seed=0)
    flipped = []
    for sample in samples:
        out = decoder(sample)
        stored = schema.decode_member(schema.CANNY, sample[schema.CANNY])
        image = schema.decode_member(schema.IMAGE, sample[schema.IMAGE])
        mirrored = not np.array_equal(out["condition"][0].numpy(), stored)
        if mirrored:
            stored, image = stored[:, ::-1], image[:, ::-1]
        np.testing.assert_array_equal(out["condition"][0].numpy(), stored)
        np.testing.assert_array_equal(out["image"].permute(1, 2, 0).numpy(), image)
        flipped.append(mirrored)
    assert any(flipped) and not all(flipped)


def test_to_model_inputs_on_samples_keeps_fields_and_refuses_floats() -> None:
    sample = SampleDecoder("canny", 32, train=False, random_flip=False, seed=0)(
        _samples("canny", 40, 40, 1)[0]
    )
    converted = to_model_inputs({**sample, COUNTS_KEY: {"decoded": 1}})
    assert converted["image"].shape == converted["condition"].shape == (3, 32, 32)
    assert torch.equal(converted["condition"][0], converted["condition"][2])
    assert converted[COUNTS_KEY] == {"decoded": 1} and converted["key"] == "k0"
    assert sample["image"].dtype == torch.uint8  # the input is left as it was
    with pytest.raises(TypeError, match="converts a batch once"):
        to_model_inputs(converted)
    with pytest.raises(ValueError, match="1 or 3"):
        to_model_inputs({**sample, "condition": torch.zeros(2, 32, 32, dtype=torch.uint8)})


def test_worker_batches_are_a_sixth_of_the_float_bytes() -> None:
    raw = collate([SampleDecoder("canny", 48, False, False, 0)(s) for s in _samples("canny", 48, 48, 4)])
    floats = to_model_inputs(raw)
    nbytes = lambda b: sum(b[k].untyped_storage().nbytes() for k in ("image", "condition"))  # noqa: E731
    assert nbytes(floats) == 6 * nbytes(raw)


# -------------------------------------------------------------------- Lightning hands it on
class _Recorder(pl.LightningModule):
    """Keeps the batch objects its steps receive; one linear layer so that there is something to train."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(6, 1)
        self.seen: dict[str, list[dict]] = {"train": [], "val": []}

    def _loss(self, batch: dict) -> torch.Tensor:
        features = torch.cat([batch["image"].mean((2, 3)), batch["condition"].mean((2, 3))], dim=1)
        return self.layer(features).pow(2).mean()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen["train"].append(batch)
        return self._loss(batch)

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen["val"].append(batch)
        return self._loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _HookRecorder(pl.Callback):
    def __init__(self) -> None:
        self.seen: dict[str, list[dict]] = {"train": [], "val": []}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen["train"].append(batch)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self.seen["val"].append(batch)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo("canny", tmp_path_factory.mktemp("demo"))


def test_steps_and_callback_hooks_receive_the_converted_batch(demo_dir: Path) -> None:
    dm = ShardDataModule(
        str(demo_dir / "train-*.tar"),
        str(demo_dir / "val-*.tar"),
        resolution=32,
        batch_size=4,
        val_batch_size=4,
        shuffle_buffer=8,
    )
    module, hooks = _Recorder(), _HookRecorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        val_check_interval=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[hooks],
    )
    trainer.fit(module, datamodule=dm)
    for stage in ("train", "val"):
        assert len(module.seen[stage]) == 2
        assert all(a is b for a, b in zip(module.seen[stage], hooks.seen[stage], strict=True))  # one object
        for batch in module.seen[stage]:
            assert batch["image"].dtype == batch["condition"].dtype == torch.float32
            assert batch["image"].shape == batch["condition"].shape == (4, 3, 32, 32)
            assert batch["image"].min() >= -1 and batch["condition"].max() <= 1
            assert batch[COUNTS_KEY]["decoded"] == 4
    expected = to_model_inputs(next(iter(dm.val_dataloader())))
    assert torch.equal(module.seen["val"][0]["image"], expected["image"])
    assert torch.equal(module.seen["val"][0]["condition"], expected["condition"])

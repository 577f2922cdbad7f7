"""Data reliability: bad samples, hostile members, broken and vanishing shards never cost a run.

Every skip is counted by a named reason, the counts travel inside the batches to the main process
(also from DataLoader workers), ``DataHealth`` logs them and stops the run over its limit, and a
resumed run reshuffles instead of replaying the sample order of the run's start.
"""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import RES, PickleTrap, good_members, make_datamodule, write_shard

from src.callbacks.data_health import DataHealth
from src.data import schema
from src.data.health import COUNTS_KEY, DataHealthError, SkipCounter
from src.data.pipeline import resume_seed

N_GOOD = 6  # good samples per shard
#: what one shard of ``_bad_shard`` adds up to, summed over the batches' ``data_counts``.
PER_SHARD = {
    "decoded": N_GOOD + 2,
    "skipped/truncated_image": 1,
    "skipped/size_mismatch": 1,
    "skipped/missing_canny.png": 1,
    "skipped/undecodable_text": 1,
    "noted/empty_caption": 1,
    "noted/unexpected_member": 2,
}


def _bad_samples(prefix: str, seed: int, payload: bytes) -> dict[str, dict[str, bytes]]:
    """N_GOOD good samples and one of each kind of bad sample, under keys starting with ``prefix``."""
    good = good_members(seed + 100)
    samples = {  # bad ones first, so a short run meets them
        f"{prefix}truncjpg": {**good, "jpg": good["jpg"][: len(good["jpg"]) // 2]},
        f"{prefix}wrongsize": {
            **good,
            "canny.png": schema.encode_member("canny.png", np.zeros((RES // 2, RES), np.uint8)),
        },
        f"{prefix}nocondition": {k: v for k, v in good.items() if k != "canny.png"},
        f"{prefix}latin1": {**good, "txt": "café crème".encode("latin-1")},
        f"{prefix}emptycaption": {**good, "txt": b""},  # kept: an empty prompt is valid training data
        f"{prefix}pickles": {**good, "pyd": payload, "pickle": payload},  # kept; the pickles are never read
    }
    return {**samples, **{f"{prefix}good{i}": good_members(seed + i) for i in range(N_GOOD)}}


@pytest.fixture
def trap(tmp_path: Path) -> tuple[Path, bytes]:
    """A pickle whose loading creates ``path`` (checked to work, then reset)."""
    path = tmp_path / "unpickled"
    payload = pickle.dumps(PickleTrap(str(path)))
    pickle.loads(payload).close()
    assert path.exists()
    path.unlink()
    return path, payload


@pytest.fixture
def bad_dir(tmp_path: Path, trap: tuple[Path, bytes]) -> Path:
    """Two shards, each with good samples, every kind of bad sample and pickle members."""
    out = tmp_path / "bad"
    out.mkdir()
    for index in range(2):
        write_shard(out / f"bad-{index:06d}.tar", _bad_samples(f"s{index}", 10 * index, trap[1]))
    return out


def _summed(batches: list[dict]) -> Counter:
    return sum((Counter(batch[COUNTS_KEY]) for batch in batches), Counter())


# ----------------------------------------------------------------------------- counted skips
@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_bad_sample_is_skipped_and_its_count_reaches_the_main_process(
    bad_dir: Path, num_workers: int, trap: tuple[Path, bytes]
) -> None:
    dm = make_datamodule(bad_dir, bad_dir, num_workers=num_workers, val_batch_size=3)
    batches = list(dm.val_dataloader())
    keys = sorted(k for batch in batches for k in batch["key"])
    kept = [f"good{i}" for i in range(N_GOOD)] + ["emptycaption", "pickles"]
    assert keys == sorted(f"s{index}{key}" for index in range(2) for key in kept)
    assert _summed(batches) == {key: 2 * value for key, value in PER_SHARD.items()}
    empty = [
        c for batch in batches for c, k in zip(batch["caption"], batch["key"], strict=True) if "empty" in k
    ]
    assert empty == ["", ""]
    assert not trap[0].exists()


@pytest.mark.parametrize("member", ["jpg", "canny.png", "seg.png"])
def test_cut_off_images_are_truncated_and_garbage_is_undecodable(member: str) -> None:
    array = np.random.default_rng(0).integers(0, 255, (RES, RES, 3), dtype=np.uint8)
    data = schema.encode_member(member, array[..., 0] if member == "canny.png" else array)
    assert schema.decode_member(member, data).shape[:2] == (RES, RES)
    for bad, reason in (
        (data[: len(data) * 2 // 3], "truncated_image"),
        (b"garbage" * 9, "undecodable_image"),
    ):
        with pytest.raises(schema.SampleError) as info:
            schema.decode_member(member, bad)
        assert info.value.reason == reason


def test_pickle_members_are_never_unpickled_on_the_worker_path(
    bad_dir: Path, trap: tuple[Path, bytes]
) -> None:
    dm = make_datamodule(bad_dir, bad_dir, num_workers=2, batch_size=2)
    train = list(dm.train_dataloader())
    val = list(dm.val_dataloader())
    assert train and val and all(COUNTS_KEY in batch for batch in train + val)
    assert not trap[0].exists()
    with pytest.raises(ValueError, match="not a schema member"):
        schema.decode_member("pyd", trap[1])


def test_truncated_tar_and_shard_vanished_after_resolution_follow_the_policy(tmp_path: Path) -> None:
    for index in range(3):
        write_shard(
            tmp_path / f"s-{index:06d}.tar", {f"s{index}k{i}": good_members(10 * index + i) for i in range(4)}
        )
    data = (tmp_path / "s-000001.tar").read_bytes()
    (tmp_path / "s-000001.tar").write_bytes(data[: len(data) // 2 + 100])
    dm = make_datamodule(str(tmp_path / "s-*.tar"), str(tmp_path / "s-*.tar"), num_workers=2, batch_size=2)
    (tmp_path / "s-000002.tar").unlink()  # after the URL list was resolved
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        batches = list(loader)
        keys = {k for batch in batches for k in batch["key"]}
        assert {f"s0k{i}" for i in range(4)} <= keys and not any(k.startswith("s2") for k in keys)
        counts = _summed(batches)
        assert counts["skipped/shard_missing"] == 1 and counts["skipped/shard_read_error"] >= 1


def test_shard_deleted_mid_epoch_is_counted_and_reading_goes_on(tmp_path: Path) -> None:
    for index in range(3):
        write_shard(tmp_path / f"m-{index:06d}.tar", {f"m{index}k{i}": good_members(i) for i in range(3)})
    dm = make_datamodule(str(tmp_path / "m-*.tar"), batch_size=1, shuffle_buffer=1)
    batches = iter(dm.train_dataloader())
    first = next(batches)  # the first shard is open now
    for path in tmp_path.glob("m-*.tar"):
        path.unlink()
    rest = list(batches)
    assert len(rest) == 2 and {k[:2] for b in rest for k in b["key"]} == {first["key"][0][:2]}
    assert _summed([first, *rest])["skipped/shard_missing"] == 2


def test_a_stream_without_any_readable_shard_stops_instead_of_spinning(tmp_path: Path) -> None:
    write_shard(tmp_path / "g-000000.tar", {"k0": good_members(0)})
    dm = make_datamodule(str(tmp_path / "g-*.tar"), resampled=True, epoch_samples=8, num_workers=2)
    dm.train_skips = SkipCounter("train", max_consecutive_skips=50)
    (tmp_path / "g-000000.tar").unlink()
    with pytest.raises(DataHealthError, match="50 skips in a row"):
        next(iter(dm.train_dataloader()))


# ------------------------------------------------------------------------------- DataHealth
class _Probe(pl.LightningModule):
    """The smallest module that reads a batch the way OFTControlModule does (image/condition/caption)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(6, 1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        features = torch.cat([batch["image"].mean((2, 3)), batch["condition"].mean((2, 3))], dim=1)
        return self.layer(features).pow(2).mean() * len(batch["caption"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(dm: pl.LightningDataModule, health: DataHealth, **trainer_kw) -> pl.Trainer:
    kw = dict(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer = pl.Trainer(callbacks=[health], **{**kw, **trainer_kw})
    trainer.fit(_Probe(), datamodule=dm)
    return trainer


def test_data_health_logs_counts_from_workers(bad_dir: Path) -> None:
    dm = make_datamodule(bad_dir, num_workers=2, batch_size=2, shuffle_buffer=1)
    trainer = _fit(dm, DataHealth(max_skip_fraction=0.9, min_samples=0))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("data/")}
    expected = {f"data/{key}": 2.0 * value for key, value in PER_SHARD.items()}  # 2 workers, 1 shard each
    assert metrics == {**expected, "data/skip_fraction": pytest.approx(8 / (8 + 16))}


def test_data_health_stops_over_the_limit_naming_fraction_reasons_and_key(bad_dir: Path) -> None:
    dm = make_datamodule(bad_dir, num_workers=2, batch_size=2, shuffle_buffer=1)
    with pytest.raises(DataHealthError) as info:
        _fit(dm, DataHealth(max_skip_fraction=0.05, min_samples=4))
    message = str(info.value)
    assert "over the limit 5.0%" in message and "callbacks.data_health.max_skip_fraction" in message
    assert "% of samples were skipped" in message and "top reasons" in message


def test_data_health_waits_for_min_samples(bad_dir: Path) -> None:
    """Over the limit from the first bad sample on, yet the run goes on: fewer samples than `min_samples`."""
    dm = make_datamodule(bad_dir, num_workers=0, batch_size=2, shuffle_buffer=1)
    health = DataHealth(max_skip_fraction=0.0, min_samples=10_000)
    trainer = _fit(dm, health)
    skipped = sum(v for k, v in health.train.items() if k.startswith("skipped/"))
    assert skipped > 0 and skipped + health.train["decoded"] < health.min_samples  # counted, below the floor
    assert trainer.callback_metrics["data/skip_fraction"] > health.max_skip_fraction  # the limit was exceeded
    assert trainer.current_epoch == 1 and trainer.global_step > 0  # ...and the epoch still finished


@pytest.mark.parametrize("broken", ["not_a_tar", "too_few_samples"])
def test_an_epoch_without_batches_stops_the_run(tmp_path: Path, broken: str) -> None:
    """Every shard unreadable, or fewer samples than a batch: epochs would repeat forever, empty."""
    for index in range(2):
        path = tmp_path / f"e-{index:06d}.tar"
        if broken == "not_a_tar":
            path.write_bytes(b"this is not a tar file " * 100)
        else:
            write_shard(path, {f"e{index}": good_members(index)})
    dm = make_datamodule(str(tmp_path / "e-*.tar"), num_workers=0, batch_size=4)
    with pytest.raises(DataHealthError, match="yielded no batch"):
        _fit(dm, DataHealth(), max_epochs=-1, max_steps=5)


def test_data_health_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="max_skip_fraction"):
        DataHealth(max_skip_fraction=1.5)


# ----------------------------------------------------------------------------- resume order
def _order(dm, trainer=None) -> list[str]:
    dm.trainer = trainer
    return [k for batch in dm.train_dataloader() for k in batch["key"]]


def test_fresh_runs_replay_and_resumed_runs_reshuffle(tmp_path: Path) -> None:
    for index in range(4):
        write_shard(tmp_path / f"r-{index:06d}.tar", {f"r{index}k{i}": good_members(i) for i in range(4)})
    make = lambda: make_datamodule(str(tmp_path / "r-*.tar"), batch_size=1, shuffle_buffer=4, resolution=16)  # noqa: E731
    at = lambda epoch, step: SimpleNamespace(current_epoch=epoch, global_step=step, world_size=1)  # noqa: E731
    fresh = _order(make())
    assert fresh == _order(make()) == _order(make(), at(0, 0))  # same seed: same order
    resumed = _order(make(), at(1, 16))
    assert resumed == _order(make(), at(1, 16)) and sorted(resumed) == sorted(fresh)
    assert resumed != fresh  # a resume does not replay the run's start
    assert _order(make(), at(0, 7)) != fresh  # not even when resuming inside epoch 0
    assert resume_seed(0, 0, 0) == 0 and len({resume_seed(0, e, s) for e in range(3) for s in (0, 5)}) == 6


def test_lightning_restores_epoch_and_step_before_building_the_loader(tmp_path: Path) -> None:
    for index in range(2):
        write_shard(tmp_path / f"c-{index:06d}.tar", {f"c{index}k{i}": good_members(i) for i in range(4)})
    seeds: list[int] = []
    dm = make_datamodule(str(tmp_path / "c-*.tar"), batch_size=2, resolution=16, seed=3)
    build = dm.train_dataloader
    dm.train_dataloader = lambda: (seeds.append(dm.stream_seed()), build())[1]
    first = _fit(dm, DataHealth(), max_epochs=-1, max_steps=6)
    ckpt = tmp_path / "step6.ckpt"
    first.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=9,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[DataHealth()],
    )
    trainer.fit(_Probe(), datamodule=dm, ckpt_path=ckpt, weights_only=False)
    assert saved["global_step"] == 6
    assert seeds == [3, resume_seed(3, saved["epoch"], 6)] and seeds[1] != 3


# ------------------------------------------------------------------------- the real training entry
@pytest.mark.slow
def test_real_training_run_counts_skips_and_stops_over_the_limit(bad_dir: Path, config_factory) -> None:
    """OFTControlModule ignores ``data_counts``; DataHealth from conf/callbacks stops the run.

    (The fast tests of ``src.train`` already train the real module on batches with ``data_counts``.)
    """
    from src.train import train

    data = [
        "data=shards",
        f"data.train_shards={bad_dir}/bad-*.tar",
        "data.num_workers=2",
        "data.batch_size=2",
        "data.shuffle_buffer=1",
        "callbacks.data_health.min_samples=0",
    ]
    metrics = train(config_factory("debug=fdr", *data, "callbacks.data_health.max_skip_fraction=1.0"))
    assert metrics["data/decoded"] >= 2 and "data/skip_fraction" in metrics
    with pytest.raises(DataHealthError, match="callbacks.data_health.max_skip_fraction"):
        train(config_factory("debug=fdr", *data, "callbacks.data_health.max_skip_fraction=0.01"))

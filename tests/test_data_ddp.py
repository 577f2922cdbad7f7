"""Two ranks on CPU (gloo) stream the training shards through ``ShardDataModule`` as DDP ranks do.

The fixture converts the demo COCO layout into 8 train shards of 4 samples (``data_prep.coco`` with
``shard_size=4``), then forks two ranks (``torch.multiprocessing.start_processes``, so they do not import
torch and Lightning again), each with a torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) and ``init_process_group("gloo")``. Each rank builds the train loader
once per scenario, as Lightning does, passes over it twice (two epochs) and writes the keys of every
batch to ``rank<r>.json``.

How a rank learns its place: ``wds.split_by_node`` and the pipeline's seeds call
``wds.utils.pytorch_worker_info()``, which takes ``RANK``/``WORLD_SIZE`` from the environment when both
are set (torchrun, SLURM wrappers) and otherwise asks ``torch.distributed`` (Lightning's launcher sets
``WORLD_SIZE`` but not ``RANK``). DataLoader workers are forked, so they inherit either (with a spawn or
forkserver start method the ``torch.distributed`` route is lost in the workers: every rank would then
read every shard). Every scenario
runs under both sources: ``env`` (the variables set) and ``dist`` (both removed after
``init_process_group``). ``batches_per_epoch()`` reads the world size from the attached trainer only, so
each rank attaches a minimal trainer stub carrying ``world_size``.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from src.data.datamodule import ShardDataModule

WORLD = 2
N_SHARDS, PER_SHARD, BATCH, EPOCHS = 8, 4, 4, 2
N_TRAIN = N_SHARDS * PER_SHARD
EPOCH_SAMPLES = N_TRAIN  # resampled: 32 // (2 ranks x 4) = 4 batches per rank and epoch
SOURCES = ("env", "dist")
WORKERS = (0, 2)
#: scenario name -> ShardDataModule arguments
SCENARIOS: dict[str, dict[str, Any]] = {
    f"{kind}-w{workers}": {"num_workers": workers, **extra}
    for kind, extra in (
        ("resampled", {"resampled": True, "epoch_samples": EPOCH_SAMPLES}),
        ("split", {"resampled": False}),
    )
    for workers in WORKERS
}


@dataclass
class TrainerStub:
    """What ``ShardDataModule`` reads from its trainer: world size, and epoch/step for the stream seed."""

    world_size: int
    current_epoch: int = 0
    global_step: int = 0


# ------------------------------------------------------------------------------------- one rank
def read_epochs(shards: str, world_size: int, **kwargs: Any) -> dict[str, Any]:
    """Batches per epoch and the keys of every batch of ``EPOCHS`` passes over the train loader."""
    dm = ShardDataModule(
        shards, condition="canny", resolution=32, batch_size=BATCH, shuffle_buffer=8, seed=0, **kwargs
    )
    dm.trainer = TrainerStub(world_size)
    dm.setup("fit")
    loader = dm.train_dataloader()  # once per fit, as Lightning asks for it; every pass is an epoch
    epochs = [[list(batch["key"]) for batch in loader] for _ in range(EPOCHS)]
    return {"batches_per_epoch": dm.batches_per_epoch(), "epochs": epochs}


def run_rank(shards: str, out_dir: str) -> None:
    """Body of one rank: join the gloo group, read every scenario under both rank sources, write json."""
    import torch.distributed as dist
    import webdataset as wds

    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    record: dict[str, Any] = {}
    for source in SOURCES:
        if source == "dist":  # as with Lightning's launcher / mp.spawn: only torch.distributed knows
            os.environ.pop("RANK")
            os.environ.pop("WORLD_SIZE")
        record[source] = {
            "worker_info": list(wds.utils.pytorch_worker_info()),
            **{name: read_epochs(shards, world, **kw) for name, kw in SCENARIOS.items()},
        }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------- the launch
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_entry(rank: int, shards: str, out_dir: str, port: int) -> None:
    """Set the torchrun environment of ``rank`` (in the forked child only) and run it."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)  # no OpenMP region in a forked child of a process that may have used one
    run_rank(shards, out_dir)


def launch(shards: str, out_dir: Path, timeout: float = 300.0) -> None:
    """Run ``WORLD`` ranks as forks of this process (so no rank pays for importing torch and Lightning
    again) and wait for all of them; a failing rank's traceback is raised here, a hang is killed."""
    import torch.multiprocessing as mp

    context = mp.start_processes(
        _rank_entry, args=(shards, str(out_dir), _free_port()), nprocs=WORLD, join=False, start_method="fork"
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1.0):
            assert time.monotonic() < deadline, f"the ranks did not finish within {timeout} s"
    finally:
        for proc in context.processes:
            if proc.is_alive():
                proc.kill()
                proc.join()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Build 8 shards x 4 samples, run the two ranks, return their records (index = rank)."""
    from data_prep import coco
    from data_prep.demo_photos import write_coco_layout

    base = tmp_path_factory.mktemp("ddp-data")
    images, captions = write_coco_layout(base / "coco")
    summary = coco.convert(
        images,
        captions,
        base / "shards",
        val_fraction=0.2,
        shard_size=PER_SHARD,
        options=coco.CannyOptions(resolution=32),
    )
    assert summary["splits"]["train"] == {
        "shards": N_SHARDS,
        "samples": N_TRAIN,
        "bytes": summary["splits"]["train"]["bytes"],
    }
    out = base / "ranks"
    out.mkdir()
    launch(str(base / "shards" / "train-*.tar"), out)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


def _keys(epoch: list[list[str]]) -> list[str]:
    return [key for batch in epoch for key in batch]


# ---------------------------------------------------------------------------------- the checks
@pytest.mark.parametrize("source", SOURCES)
def test_each_rank_knows_its_place(ranks: list[dict[str, Any]], source: str) -> None:
    for rank, record in enumerate(ranks):
        assert record[source]["worker_info"] == [rank, WORLD, 0, 1]


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("source", SOURCES)
def test_resampled_ranks_get_equal_batches_of_different_samples(
    ranks: list[dict[str, Any]], source: str, workers: int
) -> None:
    runs = [record[source][f"resampled-w{workers}"] for record in ranks]
    expected = EPOCH_SAMPLES // (WORLD * BATCH)
    assert [run["batches_per_epoch"] for run in runs] == [expected] * WORLD
    for epoch in range(EPOCHS):
        per_rank = [run["epochs"][epoch] for run in runs]
        assert [len(batches) for batches in per_rank] == [expected] * WORLD, f"epoch {epoch}"
        assert all(len(batch) == BATCH for batches in per_rank for batch in batches)
        assert _keys(per_rank[0]) != _keys(per_rank[1]), f"both ranks read the same samples in epoch {epoch}"
    for run in runs:  # and every epoch draws anew
        assert _keys(run["epochs"][0]) != _keys(run["epochs"][1])


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("source", SOURCES)
def test_split_epoch_reads_every_sample_exactly_once(
    ranks: list[dict[str, Any]], source: str, workers: int
) -> None:
    runs = [record[source][f"split-w{workers}"] for record in ranks]
    assert all(run["batches_per_epoch"] is None for run in runs)
    for epoch in range(EPOCHS):
        per_rank = [_keys(run["epochs"][epoch]) for run in runs]
        everything = per_rank[0] + per_rank[1]
        assert len(everything) == len(set(everything)), f"a sample was read twice in epoch {epoch}"
        assert len(set(everything)) == N_TRAIN, f"epoch {epoch} covered {len(set(everything))} of {N_TRAIN}"
        assert [len(keys) for keys in per_rank] == [N_TRAIN // WORLD] * WORLD  # 4 shards per rank

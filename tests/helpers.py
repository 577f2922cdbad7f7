"""Helpers shared by the tests (imported as `helpers`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
RES = 64  # the demo shards' stored resolution
STEPS = 2  # sampling steps in tests: enough to run the scheduler loop and the guidance branches


# ----------------------------------------------------------------------------------------------- configs
def compose_config(*overrides: str, name: str = "train", output_dir: Path | None = None):
    """Compose `conf/<name>.yaml` as `python -m src.<name>` would, with the Hydra runtime config set.

    `output_dir` is where the run writes: `paths.output_dir` for training, `out_dir` for generate/evaluate.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(name, overrides=list(overrides), return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            if "paths" in cfg:
                cfg.paths.output_dir = str(output_dir)
            else:
                cfg.out_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


# ----------------------------------------------------------------------------------------- entry points
def run_module(module: str, *args: str, timeout: int = 300, preexec=None) -> subprocess.CompletedProcess:
    """``python -m module args...`` from the repository root, offline and on one thread, output captured."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec,
    )


# ----------------------------------------------------------------------------------------------- shards
class PickleTrap:
    """Unpickling this object creates a file: proof that something unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    """A tar shard of `{key: {member extension: bytes}}`, written with the standard library only."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def png_header_only(width: int, height: int, channels: int = 3) -> bytes:
    """A tiny, valid-looking PNG whose IHDR declares `width` x `height` pixels (a decompression bomb's
    header: the file is a few dozen bytes, decoding it would allocate width * height * channels)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    color = {1: 0, 3: 2}[channels]
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def write_tar(path: Path, entries: list) -> None:
    """A tar of `entries`, each `(name, bytes)` for a regular file or a ready `tarfile.TarInfo` (links,
    devices: written as headers only); `(name, None, size)` writes a header declaring `size` bytes whose
    data is a hole (a sparse file: the tar takes a few KB on disk whatever `size` says)."""
    with open(path, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
            elif len(entry) == 3:
                name, _, size = entry
                info = tarfile.TarInfo(name)
                info.size = size
                raw.write(info.tobuf(tarfile.GNU_FORMAT))
                blocks = -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                raw.seek(blocks, 1)  # the data: a hole
                tar.offset = raw.tell()
            else:
                name, data = entry
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def special_member(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    """A header-only tar member of type `kind` (`tarfile.SYMTYPE`, `LNKTYPE`, `CHRTYPE`, `FIFOTYPE`...)."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3  # /dev/null's numbers
    return info


def read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    """`{key: {member extension: bytes}}` of a shard, read with the standard library only."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for info in tar.getmembers():
            key, _, ext = info.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return samples


def read_shards(directory: Path, pattern: str = "*.tar") -> dict[str, dict[str, bytes]]:
    """The samples of every shard in `directory` matching `pattern`, in shard order."""
    return {k: v for path in sorted(directory.glob(pattern)) for k, v in read_shard(path).items()}


def good_members(seed: int) -> dict[str, bytes]:
    """The members of a valid canny sample at `RES` px (random image, its edges, a caption)."""
    import cv2
    import numpy as np

    from src.data import schema

    rgb = np.random.default_rng(seed).integers(0, 255, (RES, RES, 3), dtype=np.uint8)
    edges = cv2.Canny(rgb, 100, 200)
    return {
        "jpg": schema.encode_member("jpg", rgb),
        "txt": f"caption {seed}".encode(),
        "json": b"{}",
        "canny.png": schema.encode_member("canny.png", edges),
    }


def make_datamodule(train, val=None, **kw):
    """A canny `ShardDataModule` at `RES` px without workers, set up for fitting."""
    from src.data.datamodule import ShardDataModule

    defaults = dict(
        condition="canny",
        resolution=RES,
        batch_size=4,
        val_batch_size=3,
        num_workers=0,
        shuffle_buffer=8,
        seed=0,
    )
    dm = ShardDataModule(train, val, **{**defaults, **kw})
    dm.prepare_data()
    dm.setup("fit")
    return dm


# ----------------------------------------------------------------------------------------------- runs
def make_trained_run(out: Path, *overrides: str) -> Path:
    """A run directory as `python -m src.train` leaves it, with perturbed trained tensors instead of training:
    `config.yaml` plus `checkpoints/last.ckpt` written through the module's own checkpoint hook."""
    import torch
    from hydra.utils import instantiate

    from src.models.run import write_run_config
    from src.oft import project_coft_

    cfg = compose_config("debug=default", *overrides, output_dir=out)
    module = instantiate(cfg.module, condition=cfg.task.condition)  # as src.train builds it
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * (0.05 if "oft" in name else 0.02))
    project_coft_(module.unet)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    write_run_config(cfg, out)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, out / "checkpoints" / "last.ckpt")
    return out


def demo_inputs(n: int = 2):
    """The first `n` validation samples of the canny demo shards, as generation inputs."""
    from data_prep.demo import build_demo
    from src.data.inputs import collect_inputs

    shards = build_demo("canny", Path(compose_config().paths.data_dir) / "demo")
    return collect_inputs(str(shards / "val-*.tar"), "canny", RES, limit=n)

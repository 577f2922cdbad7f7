"""Shared shard writer used by every converter.

A converter lists its source items (cheap, picklable) and gives a ``make_sample`` function that turns
one item into the schema's members (``src.data.schema``), raising ``SampleError(reason)`` to skip it.
This module then

- plans deterministically: items are ordered by a salted SHA-1 of their source id; items pinned to a
  split (``SourceItem.split``, e.g. a dataset's own validation folder) stay there; of the others the
  first ``round(N * val_fraction)`` go to ``val`` (at least one when the fraction is positive), the
  rest to ``train``; each split is cut into shards of ``shard_size`` samples in that order, named
  ``OUT/{split}-{index:06d}.tar``. The same inputs and settings always give the same shards, byte for
  byte (tar headers carry fixed owners and mtimes);
- writes each shard to a hidden temporary name (``.{name}.tmp``), fsyncs it and renames it when
  complete, so an interrupted (even SIGKILLed) run never leaves a truncated shard that looks finished;
- resumes: a shard whose final file exists with a matching fingerprint (settings + source ids) in
  ``OUT/_state/{name}.json`` is skipped, and a run that has nothing left to do writes nothing at all.
  A finished shard from different settings or inputs is an error (use ``overwrite`` or a new OUT);
- runs shards in parallel worker processes with a tqdm bar, and writes ``OUT/summary.json``:
  samples written per split, skipped counts by reason, shard counts and seconds;
- holds ``OUT`` exclusively (``src.locks.FolderLock``): a second converter into the same folder is
  refused with the first one's pid, and a lock left by a killed converter is taken over;
- reports a folder it cannot write (read-only, full) as one ``OutputError`` line and removes the
  partial temporary shard it was writing.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from src.data import schema
from src.errors import ConfigError, OutputError
from src.fileio import fsync_dir
from src.locks import FolderLock

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
STATE_DIR = "_state"
TAR_MTIME = 0  # fixed so shards are reproducible byte for byte


@dataclass(frozen=True)
class SourceItem:
    """One source sample: its stable id (unique within the dataset) and converter-specific payload.

    ``split`` pins the item to a split (e.g. ADE20K's own training/validation folders); items without
    one are assigned by ``val_fraction``.
    """

    source_id: str
    payload: Any = None
    split: str | None = None


MakeSample = Callable[[SourceItem], dict[str, bytes]]


@dataclass(frozen=True)
class ShardPlan:
    """The items that make up one shard."""

    split: str
    index: int
    items: tuple[SourceItem, ...]

    @property
    def name(self) -> str:
        """File name of the finished shard, e.g. ``train-000000.tar``."""
        return f"{self.split}-{self.index:06d}.tar"

    def fingerprint(self, settings: dict[str, Any]) -> str:
        """Hash of the settings and the ordered source ids: equal fingerprints mean equal shards."""
        text = json.dumps({"settings": settings, "ids": [i.source_id for i in self.items]}, sort_keys=True)
        return hashlib.sha1(text.encode("utf-8")).hexdigest()


def item_rank(source_id: str, salt: str) -> str:
    """Salted SHA-1 of a source id: the deterministic pseudo-random order used for splits and shards."""
    return hashlib.sha1(f"{salt}:{source_id}".encode()).hexdigest()


def _assign_splits(ordered: list[SourceItem], val_fraction: float) -> dict[str, list[SourceItem]]:
    """Pinned items keep their split; of the others the first ``round(N * val_fraction)`` go to val."""
    free = [item for item in ordered if item.split is None]
    n_val = round(len(free) * val_fraction)
    if val_fraction > 0 and n_val == 0 and len(free) > 1:
        n_val = 1
    splits = {"train": free[n_val:], "val": free[:n_val]}
    for item in ordered:
        if item.split is not None:
            if not re.fullmatch(r"[a-z0-9_]+", item.split):
                raise ValueError(f"split name {item.split!r} must be lowercase letters, digits or '_'")
            splits.setdefault(item.split, []).append(item)
    return splits


def plan_shards(
    items: Iterable[SourceItem],
    *,
    val_fraction: float,
    shard_size: int,
    max_samples: int | None = None,
    salt: str = "oft-control",
) -> list[ShardPlan]:
    """Assign items to splits and shards deterministically (see the module docstring)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    ordered = sorted(items, key=lambda item: item_rank(item.source_id, salt))
    ids = [item.source_id for item in ordered]
    if len(set(ids)) != len(ids):
        raise ValueError("source ids are not unique")
    if max_samples is not None:
        ordered = ordered[:max_samples]
    plans = []
    for split, part in _assign_splits(ordered, val_fraction).items():
        for index, start in enumerate(range(0, len(part), shard_size)):
            plans.append(ShardPlan(split, index, tuple(part[start : start + shard_size])))
    return plans


# ------------------------------------------------------------------------------------ one shard
def output_error(path: Path, error: OSError) -> OutputError:
    """One line for a write that failed: the file, the system's reason and the likely cause."""
    return OutputError(
        f"cannot write {path}: {error.strerror or error} (is the output folder read-only or full?)"
    )


class _OutputFile:
    """A binary file for writing whose failures (a read-only or full folder) are ``OutputError`` lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._file = open(path, "wb")  # noqa: SIM115 - closed by close(), also on errors
        except OSError as error:
            raise output_error(path, error) from error

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self._file, method)(*args)
        except OSError as error:
            raise output_error(self.path, error) from error

    def write(self, data: bytes) -> int:
        return self._call("write", data)

    def tell(self) -> int:
        return self._file.tell()

    def flush(self) -> None:
        self._call("flush")

    def fsync(self) -> None:
        self._call("flush")
        try:
            os.fsync(self._file.fileno())
        except OSError as error:
            raise output_error(self.path, error) from error

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as error:  # a buffered write that failed at close
            raise output_error(self.path, error) from error


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Append one file to a tar with fixed metadata."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _write_sample(tar: tarfile.TarFile, key: str, members: dict[str, bytes]) -> int:
    """Write one sample's members in schema order; return the bytes written."""
    schema.check_key(key)
    schema.check_members(tuple(members))
    for member in schema.MEMBERS:
        if member in members:
            _add_member(tar, f"{key}.{member}", members[member])
    return sum(len(v) for v in members.values())


def _atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through a temporary name and a rename (failures are ``OutputError`` lines)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise output_error(path, error) from error


@dataclass(frozen=True)
class _ShardJob:
    plan: ShardPlan
    out_dir: str
    dataset: str
    fingerprint: str
    make_sample: MakeSample


def _write_items(tar: tarfile.TarFile, job: _ShardJob) -> tuple[int, int, Counter]:
    """Write the plan's samples to ``tar``; return (samples written, payload bytes, skips by reason)."""
    written, nbytes, skipped = 0, 0, Counter()
    for item in job.plan.items:
        try:
            members = job.make_sample(item)
        except schema.SampleError as exn:
            skipped[exn.reason] += 1
            log.info("skipped %s: %s", item.source_id, exn)
            continue
        nbytes += _write_sample(tar, schema.make_key(job.dataset, item.source_id), members)
        written += 1
    return written, nbytes, skipped


def add_writer_args(parser: argparse.ArgumentParser) -> None:
    """The options every converter shares: output folder, sample cap, workers, shard size, resolution."""
    parser.add_argument("--out", required=True, help="output folder for {train,val}-NNNNNN.tar")
    parser.add_argument("--max-samples", type=int, default=None, help="convert at most N images")
    parser.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--resolution", type=int, default=None, help="resize shorter side + centre crop")
    parser.add_argument("--overwrite", action="store_true", help="delete previous shards in --out first")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an error (default: one line, exit status 2)",
    )


def add_canny_args(parser: argparse.ArgumentParser) -> None:
    """The canny annotator's options (COCO, and ADE20K with --canny): thresholds and the image Canny reads."""
    from src.data.annotators import CANNY_HIGH, CANNY_LOW

    parser.add_argument("--canny-low", type=int, default=CANNY_LOW)
    parser.add_argument("--canny-high", type=int, default=CANNY_HIGH)
    parser.add_argument(
        "--canny-on",
        choices=("gray", "rgb"),
        default="gray",
        help="run Canny on the grayscale image (default) or the RGB image (ControlNet)",
    )


def write_shard(job: _ShardJob) -> dict[str, Any]:
    """Write one shard (temporary name, fsync, then rename) and its state file; return its stats.

    A crash or kill at any point leaves either no ``{name}`` or the complete one; on an error (a
    read-only or full folder: ``OutputError``) the temporary file is removed at once, after a kill it is
    removed and rewritten by the next run.
    """
    out, name = Path(job.out_dir), job.plan.name
    tmp = out / f".{name}.tmp"
    try:
        raw = _OutputFile(tmp)
        try:
            with tarfile.open(fileobj=raw, mode="w") as tar:
                written, nbytes, skipped = _write_items(tar, job)
            raw.fsync()
        finally:
            raw.close()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    stats = {
        "shard": name,
        "split": job.plan.split,
        "fingerprint": job.fingerprint,
        "written": written,
        "skipped": dict(skipped),
        "bytes": nbytes,
    }
    try:
        _atomic_write_text(out / STATE_DIR / f"{name}.json", json.dumps(stats, indent=1, sort_keys=True))
        os.replace(tmp, out / name)  # the commit point: the shard exists only when complete
    except OSError as error:
        raise output_error(out / name, error) from error
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(out)
    return stats


# ----------------------------------------------------------------------------------- the dataset
def _read_state(out: Path, name: str) -> dict[str, Any] | None:
    """State of a finished shard, or None if the shard is not finished (or its state file is unreadable,
    e.g. after a power loss: the shard is then rewritten)."""
    state = out / STATE_DIR / f"{name}.json"
    if not (out / name).exists() or not state.exists():
        return None
    try:
        return json.loads(state.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("state file %s is unreadable: %s will be rewritten", state, name)
        return None


def _clear_output(out: Path) -> None:
    """Remove everything this writer puts in OUT (shards, temporaries, state, summary)."""
    for path in list(out.glob("*.tar")) + list(out.glob(".*.tmp")) + [out / SUMMARY]:
        path.unlink(missing_ok=True)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)


def _pending_jobs(plans: Sequence[ShardPlan], out: Path, overwrite: bool, **job_kw: Any) -> list[_ShardJob]:
    """Jobs for shards not yet finished; raise on finished shards that belong to another plan."""
    if overwrite:
        _clear_output(out)
    names = {p.name for p in plans}
    strays = sorted(p.name for p in out.glob("*.tar") if p.name not in names)
    if strays:
        raise ConfigError(
            f"{out} holds shards from another run ({strays[:3]}...); use --overwrite or a new --out"
        )
    jobs = []
    for plan in plans:
        fingerprint = plan.fingerprint(job_kw["settings"])
        state = _read_state(out, plan.name)
        if state is not None and state["fingerprint"] != fingerprint:
            raise ConfigError(
                f"{out / plan.name} was written with other settings or inputs; use --overwrite or a new --out"
            )
        if state is None:
            jobs.append(_ShardJob(plan, str(out), job_kw["dataset"], fingerprint, job_kw["make_sample"]))
    return jobs


def _run_jobs(jobs: list[_ShardJob], workers: int, desc: str) -> None:
    """Run shard jobs in-process (workers <= 1) or in a process pool, with a progress bar."""
    bar = tqdm(total=sum(len(j.plan.items) for j in jobs), desc=desc, unit="img", disable=not jobs)
    with bar:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                write_shard(job)
                bar.update(len(job.plan.items))
            return
        with multiprocessing.get_context().Pool(min(workers, len(jobs))) as pool:
            for stats in pool.imap_unordered(write_shard, jobs):
                bar.update(stats["written"] + sum(stats["skipped"].values()))


def _summarize(out: Path, plans: Sequence[ShardPlan], pre_skipped: Counter, extra: dict[str, Any]) -> dict:
    """Aggregate the state files of all shards into the summary dict."""
    skipped, splits = Counter(pre_skipped), {}
    for plan in plans:
        state = _read_state(out, plan.name)
        skipped.update(state["skipped"])
        split = splits.setdefault(plan.split, {"shards": 0, "samples": 0, "bytes": 0})
        split["shards"] += 1
        split["samples"] += state["written"]
        split["bytes"] += state["bytes"]
    written = sum(s["samples"] for s in splits.values())
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "written": written,
        "splits": splits,
        "skipped": dict(sorted(skipped.items())),
        "skipped_total": sum(skipped.values()),
        **extra,
    }


def print_summary(summary: dict[str, Any]) -> None:
    """What a converter's command line prints when it is done: the summary's headline counts as JSON."""
    print(json.dumps({k: summary[k] for k in ("written", "splits", "skipped", "seconds")}, indent=1))


def write_dataset(
    items: Iterable[SourceItem],
    make_sample: MakeSample,
    out_dir: str | Path,
    *,
    dataset: str,
    settings: dict[str, Any],
    val_fraction: float = 0.01,
    shard_size: int = 1000,
    max_samples: int | None = None,
    workers: int = 1,
    pre_skipped: Counter | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Plan, write (or resume) and summarize a sharded dataset; return the summary dict.

    ``settings`` (annotator and resize settings) go into every shard's fingerprint and the summary;
    ``pre_skipped`` counts items the converter dropped before planning (e.g. images without captions).
    ``out_dir`` is held exclusively for the whole conversion (``src.locks.FolderLock``).
    """
    start, out, items = time.monotonic(), Path(out_dir), list(items)
    if not overwrite:  # a finished dataset is read without the lock: concurrent readers are fine
        done = _finished_summary(items, out, settings, val_fraction, shard_size, max_samples)
        if done is not None:
            log.info("%s is up to date", out)
            return done
    with FolderLock(out, f"conversion: {dataset} shards"):
        return _write_dataset(
            items,
            make_sample,
            out,
            start,
            dataset=dataset,
            settings=settings,
            val_fraction=val_fraction,
            shard_size=shard_size,
            max_samples=max_samples,
            workers=workers,
            pre_skipped=pre_skipped,
            overwrite=overwrite,
        )


def _finished_summary(
    items: list[SourceItem],
    out: Path,
    settings: dict[str, Any],
    val_fraction: float,
    shard_size: int,
    max_samples: int | None,
) -> dict[str, Any] | None:
    """The summary of ``out`` if every planned shard is finished with these settings (nothing to write)."""
    if not (out / SUMMARY).is_file():
        return None
    plans = plan_shards(items, val_fraction=val_fraction, shard_size=shard_size, max_samples=max_samples)
    if {p.name for p in out.glob("*.tar")} != {plan.name for plan in plans}:
        return None
    for plan in plans:
        state = _read_state(out, plan.name)
        if state is None or state.get("fingerprint") != plan.fingerprint(settings):
            return None
    try:
        return json.loads((out / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _write_dataset(
    items: Iterable[SourceItem],
    make_sample: MakeSample,
    out: Path,
    start: float,
    *,
    dataset: str,
    settings: dict[str, Any],
    val_fraction: float,
    shard_size: int,
    max_samples: int | None,
    workers: int,
    pre_skipped: Counter | None,
    overwrite: bool,
) -> dict[str, Any]:
    """`write_dataset` once `out` is locked."""
    plans = plan_shards(items, val_fraction=val_fraction, shard_size=shard_size, max_samples=max_samples)
    jobs = _pending_jobs(plans, out, overwrite, settings=settings, dataset=dataset, make_sample=make_sample)
    try:
        (out / STATE_DIR).mkdir(exist_ok=True)
    except OSError as error:
        raise output_error(out / STATE_DIR, error) from error
    if not jobs and (out / SUMMARY).exists():
        log.info("%s is up to date (%d shards)", out, len(plans))
        return json.loads((out / SUMMARY).read_text(encoding="utf-8"))
    for stale in out.glob(".*.tar.tmp"):
        stale.unlink()  # leftovers of an interrupted run
    try:
        _run_jobs(jobs, workers, desc=f"{dataset} -> {out.name}")
    except BaseException:
        for partial in out.glob(".*.tar.tmp"):  # of workers stopped mid-shard (we hold the folder's lock)
            partial.unlink(missing_ok=True)
        raise
    extra = {
        "dataset": dataset,
        "settings": settings,
        "val_fraction": val_fraction,
        "shard_size": shard_size,
        "shards_written": len(jobs),
        "shards_reused": len(plans) - len(jobs),
        "seconds": round(time.monotonic() - start, 3),
    }
    summary = _summarize(out, plans, pre_skipped or Counter(), extra)
    _atomic_write_text(out / SUMMARY, json.dumps(summary, indent=1, sort_keys=True))
    return summary

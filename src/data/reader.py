"""The one reader of tar shards: members grouped into samples under the schema's checks, nothing unsafe read.

:class:`ShardReader` is a webdataset pipeline stage (urls in, raw samples out) that every pipeline uses in
place of ``wds.tarfile_to_samples``. It groups members as webdataset does (consecutive members sharing
the name up to the first dot of their base name; extensions lower-cased), opens URLs with webdataset's
``gopen`` (local files, ``pipe:``, ``http(s)://``), and adds the schema's policy, decided from each tar
header *before* a member's bytes are read:

- a member outside the schema (``.pyd``, ``.pickle``, a name without a dot) is noted
  (``unexpected_member``) and never read;
- a sample is skipped and counted, its remaining members unread, when one of its members has an unsafe
  key (``unsafe_key``, :func:`src.data.schema.check_key`), is a symbolic or hard link (``link_member``)
  or a device, fifo or other special file (``device_member``), appears twice (``duplicate_member``), is
  larger than ``limits.max_member_bytes`` (``member_too_large``) or is a caption longer than 4 bytes per
  allowed character (``caption_too_long``);
- a key with a dot (``img.v2.jpg``: webdataset's first-dot rule files it under ``img`` as ``v2.jpg``)
  loses its sample: one ``dotted_key`` skip per dotted key that has an image member; its members are never
  read, and ``img``'s own members, if any, still make a sample. A dotted name without an image member
  (``img.meta.json``) is an extra member of ``img``: ``unexpected_member``;
- a shard that cannot be opened is ``shard_missing`` (gone) or ``shard_read_error``; a tar that breaks
  mid-way (truncated, corrupt, or a pax/long-name header over :data:`MAX_HEADER_BYTES`) loses its
  remaining samples and counts ``shard_read_error`` once.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterable, Iterator
from typing import Any

from webdataset.gopen import gopen

from src.data import schema
from src.data.health import UNEXPECTED_MEMBER, SkipCounter

#: largest pax / GNU long-name header (they hold a file name and attributes: a few hundred bytes)
MAX_HEADER_BYTES = 2**20
_HEADER_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME)
_HEADER_TYPES += (tarfile.GNUTYPE_LONGLINK,)


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses to read a pax or long-name header larger than :data:`MAX_HEADER_BYTES`
    (``tarfile`` would read it whole into memory)."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _HEADER_TYPES and self.size > MAX_HEADER_BYTES:
            raise tarfile.SubsequentHeaderError(f"tar header member of {self.size} bytes")
        return super()._proc_member(tarfile_)


def _key_problem(key: str) -> str:
    """Why a sample's key makes it unusable ("" if it does not); checked once, when the sample starts."""
    try:
        schema.check_key(key)
    except schema.SampleError as error:
        return f"unsafe_key: {error}"
    return ""


def _member_problem(info: tarfile.TarInfo, ext: str, sample: dict, limits: schema.Limits) -> str:
    """Why a schema member makes its sample unusable, decided from its header alone ("" if it does not)."""
    if info.issym() or info.islnk():
        return f"link_member: {info.name!r} links to {info.linkname!r}"
    if not info.isreg():
        return f"device_member: {info.name!r} is not a regular file (tar type {info.type!r})"
    if ext in sample:
        return f"duplicate_member: {info.name!r} appears twice"
    if info.size > limits.max_member_bytes:
        return f"member_too_large: {info.name!r} has {info.size} bytes, limit {limits.max_member_bytes}"
    if ext == schema.CAPTION and info.size > 4 * limits.max_caption_chars:
        return f"caption_too_long: {info.name!r} has {info.size} bytes (data.max_caption_chars)"
    return ""


class ShardReader:
    """Pipeline stage: shard URLs (``{"url": ...}`` dicts or strings) -> raw samples
    ``{"__key__", "__url__", ext: bytes}`` (see the module docstring).

    Args:
        skips: counts and logs every skip and note; errors without a skip reason are raised.
        limits: what one sample may cost.
    """

    def __init__(self, skips: SkipCounter, limits: schema.Limits = schema.LIMITS) -> None:
        self.skips, self.limits = skips, limits

    def __call__(self, src: Iterable[Any]) -> Iterator[dict[str, Any]]:
        for item in src:
            url = item["url"] if isinstance(item, dict) else str(item)
            try:
                stream = gopen(url)
            except Exception as error:
                self.skips(error)  # shard_missing / shard_read_error; a bug is raised
                continue
            try:
                yield from self.samples(stream, url)
            except Exception as error:
                self.skips(error)
            finally:
                stream.close()

    def samples(self, stream: Any, url: str) -> Iterator[dict[str, Any]]:
        """The samples of one open tar stream."""
        sample: dict[str, Any] | None = None
        problem = ""
        dotted: dict[str, list[str]] = {}  # dotted key suffix ("v2") -> the schema members it has
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_BoundedTarInfo) as tar:
            for info in tar:
                tar.members = []  # stream mode would keep every header
                if info.isdir():
                    continue
                try:
                    key, ext = schema.split_member_name(info.name)
                except ValueError:
                    self.skips.note(UNEXPECTED_MEMBER, repr(info.name[:200]))
                    continue
                member = ext if ext in schema.MEMBERS else schema.dotted_member(ext)
                if member is None:
                    self.skips.note(UNEXPECTED_MEMBER, repr(info.name[:200]))
                    continue
                if sample is None or key != sample["__key__"]:
                    yield from self._finish(sample, problem, dotted)
                    sample, problem, dotted = {"__key__": key, "__url__": url}, _key_problem(key), {}
                if problem:
                    continue  # the sample is lost already: read nothing more of it
                if member != ext:  # a dotted key: never read
                    dotted.setdefault(ext[: -len(member) - 1], []).append(member)
                    continue
                problem = _member_problem(info, ext, sample, self.limits)
                if not problem:
                    handle = tar.extractfile(info)
                    sample[ext] = handle.read() if handle is not None else b""
        yield from self._finish(sample, problem, dotted)

    def _finish(
        self, sample: dict[str, Any] | None, problem: str, dotted: dict[str, list[str]]
    ) -> Iterator[dict[str, Any]]:
        if sample is None:
            return
        if problem:
            reason, _, detail = problem.partition(": ")
            self.skips(schema.SampleError(reason, f"{detail} in {sample['__url__']}"))
            return
        for suffix, members in dotted.items():
            name = f"{sample['__key__']}.{suffix}"
            if schema.IMAGE in members:
                detail = f"key {name!r} has a dot (members {members}) in {sample['__url__']}"
                self.skips(schema.SampleError("dotted_key", detail))
            else:
                for member in members:
                    self.skips.note(UNEXPECTED_MEMBER, repr(f"{name}.{member}"[:200]))
        if len(sample) > 2:
            yield sample

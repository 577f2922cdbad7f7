"""Files that are either complete or absent: write to a temporary sibling, fsync, rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside `folder` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a closed file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds, fsync it and rename it over `path`.

    A rename within one filesystem is atomic, so readers see the old file or the new one, never a partial
    write; if the block raises, the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_orphans(folder: str | os.PathLike, pattern: str = ".*.tmp") -> list[Path]:
    """Delete the temporary files `atomic_path` left in `folder` when its process was killed; return them.

    Only call it while holding the folder's lock (`src.locks.FolderLock`): another process's temporary
    file is a write in progress, not an orphan.
    """
    removed = []
    for path in sorted(Path(folder).glob(pattern)):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed

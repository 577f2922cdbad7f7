"""Exclusive use of an output folder: a lock file that holds the owner's pid.

Converters lock their ``--out`` folder and training locks its run directory, so two processes never mix
their files in one folder. ``FolderLock(folder, what)`` creates ``folder/.lock`` and holds an exclusive
``flock`` on it for as long as it is held, with ``pid``, host and what the process is doing written
inside. A second process asking for the same folder is refused with :class:`FolderLockedError` naming the
owner's pid. The kernel drops the ``flock`` when its process dies (also on ``kill -9``), so the file a
dead process leaves behind is a stale lock: the next process takes it over (and logs that it did). On a
filesystem without ``flock`` the pid alone decides: a lock whose pid is no longer running is stale.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
from pathlib import Path
from types import TracebackType

from src.errors import OutputError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class FolderLockedError(OutputError):
    """Another live process holds the folder's lock."""


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists (on this host)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_owner(path: Path) -> tuple[int | None, str]:
    """``(pid, description)`` written in a lock file (``(None, "")`` if unreadable)."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        return int(lines[0]), " ".join(lines[1:3])
    except (OSError, ValueError, IndexError):
        return None, ""


class FolderLock:
    """An exclusive lock on ``folder`` for the lifetime of a ``with`` block (see the module docstring).

    Args:
        folder: the output folder (created if missing).
        what: what the owner does, written in the lock and shown to a refused process (``"training"``).
    """

    def __init__(self, folder: str | os.PathLike, what: str) -> None:
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    # --------------------------------------------------------------------------------- acquiring
    def acquire(self) -> FolderLock:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for _ in range(20):  # retried only when the file is replaced under us
                if self._try_flock():
                    return self
        except OSError as error:
            raise OutputError(
                f"cannot write to output folder {self.folder} (its lock file {self.path}): "
                f"{error.strerror or error}; is it read-only or full?"
            ) from error
        raise OutputError(f"cannot lock output folder {self.folder}: its lock file keeps changing")

    def _refuse(self, pid: int | None, doing: str) -> FolderLockedError:
        owner = f"process {pid}" if pid is not None else "another process"
        return FolderLockedError(
            f"output folder {self.folder} is in use by {owner} ({doing or 'unknown'}; lock file {self.path}): "
            "wait for it to finish or stop it, or choose another folder"
        )

    def _try_flock(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._refuse(*read_owner(self.path)) from None
        except OSError as error:
            os.close(fd)
            if error.errno in _NO_FLOCK:
                return self._try_pid_file()
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:  # released and removed by its previous owner meanwhile
            same = False
        if not same:
            os.close(fd)
            return False
        self._take(fd)
        return True

    def _try_pid_file(self) -> bool:
        """The fallback without ``flock``: create the file exclusively; a dead owner's file is removed."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pid, doing = read_owner(self.path)
            if pid is not None and pid_alive(pid):
                raise self._refuse(pid, doing) from None
            log.warning(
                "removing the stale lock %s of process %s, which is no longer running", self.path, pid
            )
            self.path.unlink(missing_ok=True)
            return False
        self._take(fd)
        return True

    def _take(self, fd: int) -> None:
        """Record this process in the (now held) lock file, noting a stale owner it replaces."""
        previous = os.read(fd, 4096).decode("utf-8", errors="replace").splitlines()
        if previous and previous[0].strip().isdigit() and int(previous[0]) != os.getpid():
            state = "no longer running" if not pid_alive(int(previous[0])) else "not holding it"
            log.warning("took over the stale lock %s of process %s (%s)", self.path, previous[0], state)
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n{self.what}\non {socket.gethostname()}\n".encode())
        os.fsync(fd)
        self._fd = fd

    # --------------------------------------------------------------------------------- releasing
    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        except OSError:
            pass  # the folder went away or became read-only: the flock still ends with the close
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def is_global_rank_zero() -> bool:
    """True unless the environment says this is a non-zero rank of a distributed run (Lightning's DDP
    launcher, torchrun, SLURM): only rank zero owns a run directory's lock."""
    names = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")
    return all(os.environ.get(name, "0") in ("0", "") for name in names)

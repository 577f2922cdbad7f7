"""Errors users cause, and how every entry point reports them: one line on stderr, exit status 2.

Every error the project raises on purpose about something a user can fix (a config value, an input file,
a checkpoint, an output folder, the data) is an :class:`OFTControlError`. Each concrete class also
derives from the builtin it refines (``ValueError``, ``FileNotFoundError``, ``RuntimeError``), so code
that catches those keeps working.

Entry points run their work inside :func:`user_errors`: such an error prints ``error: <message>`` as one
line on stderr and exits with status :data:`EXIT_USER_ERROR` (2), also when Hydra's ``instantiate`` or a
DataLoader worker wrapped it. With ``--debug`` on the command line (:func:`take_debug_flag`) or
``HYDRA_FULL_ERROR=1`` in the environment the error propagates with its traceback instead. Any other
exception is a bug and always keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

EXIT_USER_ERROR = 2
DEBUG_FLAG = "--debug"
DEBUG_ENV = "OFT_CONTROL_DEBUG"
T = TypeVar("T")


class OFTControlError(Exception):
    """An error the user can fix; entry points report it in one line and exit with status 2."""


class ConfigError(OFTControlError, ValueError):
    """A config value or command-line option is wrong (names the key and a valid value)."""


class InputError(OFTControlError, ValueError):
    """An input file or folder exists but cannot be used (not an image, malformed JSON, no samples)."""


class MissingInputError(OFTControlError, FileNotFoundError):
    """A path, run, checkpoint or set of weights that the config names does not exist."""


class CheckpointError(OFTControlError, ValueError):
    """A checkpoint that cannot be read, or that was trained with another configuration."""


class OutputError(OFTControlError, RuntimeError):
    """An output folder cannot be written (read-only, full) or is in use by another process."""


class DataError(OFTControlError, RuntimeError):
    """The data are too broken to go on, or nothing could be read at all."""


def find_user_error(error: BaseException) -> OFTControlError | None:
    """``error`` itself or the first :class:`OFTControlError` among its causes (wrapping by Hydra's
    ``instantiate`` and the like), else None."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OFTControlError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def one_line(error: BaseException) -> str:
    """The error's message on one line; for an error re-raised from a DataLoader worker (whose message
    embeds the worker's traceback) the original message only."""
    text = str(error).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split()) or type(error).__name__


def debugging() -> bool:
    """True when tracebacks were asked for (``--debug`` seen, or ``HYDRA_FULL_ERROR=1``)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get(DEBUG_ENV) == "1"


def take_debug_flag(argv: list[str] | None = None) -> bool:
    """Remove ``--debug`` from ``argv`` (default ``sys.argv``) before Hydra or argparse parse it; when it
    was there, ask for full tracebacks (``HYDRA_FULL_ERROR=1`` as well, for Hydra's own reporting)."""
    argv = sys.argv if argv is None else argv
    if DEBUG_FLAG not in argv[1:]:
        return debugging()
    argv[1:] = [arg for arg in argv[1:] if arg != DEBUG_FLAG]
    os.environ[DEBUG_ENV] = os.environ["HYDRA_FULL_ERROR"] = "1"
    return True


def _in_multirun() -> bool:
    """True inside a Hydra multirun job, where a failed job is the sweep's business, not an exit."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # no Hydra, or no Hydra config: not a multirun
        return False


@contextmanager
def user_errors() -> Iterator[None]:
    """Report an :class:`OFTControlError` raised in the block as ``error: <message>`` on stderr and exit
    with status 2; re-raise it when debugging or inside a multirun, and re-raise every other error."""
    try:
        yield
    except Exception as error:
        found = find_user_error(error)
        if found is None or debugging() or _in_multirun():
            raise
        print(f"error: {one_line(found)}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None


def run_cli(main: Callable[..., T], *args: Any) -> T:
    """``__main__`` of an argparse entry point: take ``--debug``, then run ``main`` under :func:`user_errors`."""
    take_debug_flag()
    with user_errors():
        return main(*args)

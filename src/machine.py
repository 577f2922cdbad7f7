"""Where a figure was produced: the CPU model beside a wall-clock time or a weight file's digest.

Float kernels differ between CPU families (vector widths, fused multiply-adds), so the same seeded recipe
gives the same bits on the same CPU model and different ones elsewhere; a time means little without it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (e.g. "AMD EPYC 7B13"); the architecture if it says none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return re.sub(r"\((R|TM)\)", "", line.split(":", 1)[1]).strip()
    except OSError:
        pass
    return os.uname().machine

"""benchmarks/race_step.py: the race's rows timed step by step, with their trainable parameters."""

from __future__ import annotations

import re

from benchmarks import race_step
from benchmarks.controllability import ROWS
from benchmarks.race_report import NAMES


def conv(c_in: int, c_out: int, k: int = 3) -> int:
    return c_in * c_out * k * k + c_out


def test_quick_table_has_every_row_its_trainable_parameters_and_ratios(monkeypatch):
    written = []
    monkeypatch.setattr(race_step.readme, "write_section", lambda *a, **k: written.append(a))
    body = race_step.main(["--quick"])
    assert not written  # --quick never writes the README
    rows = {
        m["row"]: m
        for m in (
            re.match(r"\| (?P<row>[^|]+) \| (?P<n>[\d,]+) \| (?P<ms>[\d.]+) ms \| (?P<r>[\d.]+)x \|", line)
            for line in body.splitlines()
        )
        if m
    }
    assert list(rows) == [NAMES[m] for m in ROWS["canny"]]
    assert rows["ControlNet"]["r"] == "1.00" and all(float(m["ms"]) > 0 for m in rows.values())
    trainable = {name: int(m["n"].replace(",", "")) for name, m in rows.items()}
    # the race's hint encoder [2, 3, 10, 26] against the unshuffle encoder [32] * 4 (8x8 patches: 192 channels),
    # both ending in a convolution to the toy UNet's 32 channels, counted here from their layers
    hint = (
        conv(3, 2)
        + conv(2, 2)
        + conv(2, 3)
        + conv(3, 3)
        + conv(3, 10)
        + conv(10, 10)
        + conv(10, 26)
        + conv(26, 32)
    )
    unshuffle = conv(192, 32) + 6 * conv(32, 32) + conv(32, 32)
    assert trainable["encoder only"] == hint
    assert trainable["OFT-Control, unshuffle encoder"] - trainable["OFT-Control"] == unshuffle - hint
    more = trainable["OFT-Control, more layers"] - trainable["OFT-Control"]
    assert (
        trainable["OFT-Control, unshuffle encoder + more layers"]
        - trainable["OFT-Control, unshuffle encoder"]
        == more
    )

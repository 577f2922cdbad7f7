"""benchmarks/multi_condition.py: the quick protocol end to end, and its table against hand-computed values."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from benchmarks import multi_condition as bench
from src.metrics.base import to_uint8

pytestmark = pytest.mark.usefixtures("one_thread")


def test_table_ratios_are_to_the_single_run_of_the_same_condition() -> None:
    def entry(canny: list[float], seg: list[float]) -> dict:
        return {
            "canny_f1": canny,
            "seg_miou": seg,
            "canny_f1_chance": [0.1, 0.1],
            "seg_miou_chance": [0.2, 0.2],
        }

    seed = {
        "scores": {
            "canny alone": entry([0.4, 0.6], [0.0, 0.0]),
            "seg alone": entry([0.0, 0.0], [0.2, 0.4]),
            "joint, both": entry([0.45, 0.45], [0.27, 0.27]),
            "composed, both": entry([0.3, 0.5], [0.3, 0.3]),
        }
    }
    markdown, info = bench.table([seed])
    assert info["single"] == pytest.approx({"canny_f1": 0.5, "seg_miou": 0.3})
    joint = next(line for line in markdown.splitlines() if line.startswith("| joint, both"))
    assert "| 90% |" in joint and "| 0.270 [0.270, 0.270] | 90% |" in joint
    composed = next(line for line in markdown.splitlines() if line.startswith("| composed, both"))
    assert "| 0.400 [0.300, 0.500] | 80% |" in composed
    assert info["chance"]["canny_f1"] == pytest.approx((0.1, 0.1, 0.1))


def test_quick_protocol_selects_the_joint_lr_and_reports_every_model(tmp_path, offline_cache) -> None:
    result = bench.main(["--quick", "--out", str(tmp_path), "--max-extend", "0"])
    selected = result["selection"]
    cache = json.loads((tmp_path / "selection.json").read_text())
    # first the lr: the geometric mean of the single lrs and its two quarter-decade neighbours, at dropout 0.3
    lrs = [row["lr"] for row in selected[:3]]
    assert lrs[1] == pytest.approx((lrs[0] * lrs[2]) ** 0.5) and lrs[2] / lrs[1] == pytest.approx(10**0.25)
    assert {row["dropout"] for row in selected[:3]} == {bench.DROPOUT}
    best_lr = max(selected[:3], key=lambda row: row["score"])["lr"]
    # then the other dropouts at that lr
    assert [(row["lr"], row["dropout"]) for row in selected[3:]] == [
        (best_lr, 0.05),
        (best_lr, 0.1),
        (best_lr, 0.2),
        (best_lr, 0.5),
    ]
    for row in selected:  # each score is the smaller of the two fractions of the single runs' scores
        fractions = [row[m] / row["single"][m] for m in ("canny_f1", "seg_miou") if row["single"][m]]
        assert row["score"] == pytest.approx(min(fractions))
        name = bench.folder_name("joint", 0, row["lr"], row["dropout"])
        for given, m in (("canny", "canny_f1"), ("seg", "seg_miou")):  # one condition given: shown, not ruled
            if row["single"][m]:
                assert row[f"{m}_alone"] == pytest.approx(cache[f"{name}:{m}@{given}"] / row["single"][m])
    chosen = max((row for row in selected if row["lr"] == best_lr), key=lambda row: row["score"])
    assert f"| {chosen['lr']:.3g} (chosen) | {chosen['dropout']:g} |" in result["markdown"]
    joint = bench.folder_name("joint", 0, chosen["lr"], chosen["dropout"])
    canny, seg = (bench.folder_name(run, 0, result["lrs"][run]) for run in ("canny", "seg"))
    assert canny.startswith("canny-lr") and seg.startswith("seg-lr")  # a changed race lr trains again
    for run in (canny, seg, joint):
        assert (tmp_path / run / "checkpoints" / "last.ckpt").is_file()
    config = (tmp_path / joint / "config.yaml").read_text()
    assert f"condition_dropout: {chosen['dropout']}" in config
    # the composition's rotation scales: every pair tried on the selection conditions, the best one chosen
    fractions = {
        (c, g): min(
            cache[f"composed-rc{c:g}-rs{g:g}:canny_f1"] / cache[canny],
            cache[f"composed-rc{c:g}-rs{g:g}:seg_miou"] / cache[seg],
        )
        for c in bench.ROTATION_SCALES
        for g in bench.ROTATION_SCALES
    }
    scales = result["rotation_scales"]
    assert fractions[scales["canny"], scales["seg"]] == max(fractions.values())
    assert "| canny's rotation scale | seg 0 | seg 0.25 |" in result["markdown"]
    assert f"**{max(fractions.values()):.0%}**" in result["markdown"]
    (scores,) = [seed["scores"] for seed in result["per_seed"]]
    as_trained = {"composed, both, rotations as trained"} if set(scales.values()) != {1.0} else set()
    assert (
        set(scores)
        == {
            "canny alone",
            "seg alone",
            "joint, both",
            "joint, canny only",
            "joint, seg only",
            "composed, both",
        }
        | as_trained
    )
    n = len(scores["joint, both"]["canny_f1"])
    assert n == 4 and all(len(values) == n for entry in scores.values() for values in entry.values())
    for row in result["info"]["rows"].values():
        for lo, mean, hi in row.values():
            assert lo <= mean <= hi
    sweep = result["per_seed"][0]["disagreement"]
    assert set(sweep) == {"joint", "composed"}
    assert all(len(sweep[m]["seg_miou"]) == len(bench.STRENGTHS) for m in sweep)
    grid, plot = result["plots"]
    assert grid.parent == tmp_path and plot.is_file()  # --quick writes nothing under benchmarks/
    with Image.open(grid) as image:  # 4 conditions x (canny | segmentation | joint | composed | target)
        assert image.size == (5 * 64 + 6 * 2, 4 * 64 + 5 * 2)
        pixels = np.asarray(image.convert("RGB"))
    canny, seg = result["per_seed"][0]["grid"][:2]  # the first row's tiles are the two conditions
    assert np.abs(pixels[2:66, 2:66].astype(int) - to_uint8(canny[:1])[0]).max() <= 1
    assert np.abs(pixels[2:66, 68:132].astype(int) - to_uint8(seg[:1])[0]).max() <= 1
    assert not np.array_equal(to_uint8(canny[:1])[0], to_uint8(seg[:1])[0])
    assert re.search(
        r"Measured \d{4}-\d\d-\d\d with `python -m benchmarks.multi_condition --quick`", result["markdown"]
    )

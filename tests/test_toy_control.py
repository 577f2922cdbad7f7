"""The default run on the toy world learns control: measured with the training-time metric, not the loss."""

from __future__ import annotations

import csv

import pytest
from helpers import compose_config


@pytest.mark.slow
def test_default_canny_run_puts_edges_where_the_condition_has_them(tmp_path):
    """`python -m src.train task=canny` as shipped (toy backbone, toy-world shards, 500 steps): the generated
    images' canny edges match their own conditions at least twice as well as the other conditions', and the
    backbone still draws the captions' colours."""
    from src.train import train

    out = tmp_path / "run"
    metrics = train(compose_config("task=canny", output_dir=out))
    f1, chance = metrics["val/canny_f1"], metrics["val/canny_f1_chance"]
    assert f1 >= 0.08 and f1 >= 2 * chance, f"canny F1 {f1:.3f} vs chance {chance:.3f}"
    assert metrics["val/caption_colour_acc"] >= 0.8

    # the gain is learnt: the first validation (half-way) scores below the last one
    with open(out / "csv" / "metrics.csv") as handle:
        logged = [float(row["val/canny_f1"]) for row in csv.DictReader(handle) if row.get("val/canny_f1")]
    assert len(logged) >= 2 and logged[-1] > logged[0], logged

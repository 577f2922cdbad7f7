"""benchmarks/controllability.py + race_report.py: the bootstrap, the separation and plateau rules and the grid
extension against hand-computed cases; the toy rule and the race's config files agree; the --quick race (in
the default suite) produces every row with ordered intervals, lrs consistent with their grids, rotation
movement for the rotations only, the faithfulness table, disjoint selection and reported conditions, and
per-condition files whose means are the logged metrics; the rotation-movement figures by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from benchmarks import controllability as race
from benchmarks import race_report as report
from benchmarks.race_report import bootstrap, plateaued, separated

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ statistics
def test_bootstrap_of_constant_values_is_a_point():
    assert bootstrap(np.full((2, 5), 0.3)) == pytest.approx((0.3, 0.3, 0.3))


def test_bootstrap_of_two_conditions_spans_both():
    """One seed, conditions [0, 1]: resample means are 0, 0.5, 1 with probability 1/4, 1/2, 1/4, so the 2.5th
    and 97.5th percentiles are 0 and 1, and the estimate is the plain mean 0.5."""
    assert bootstrap(np.array([[0.0, 1.0]])) == (0.0, 0.5, 1.0)


def test_bootstrap_resamples_seeds_too():
    """Two seeds that agree within themselves: only the seed draw varies the mean (0, 0.5 or 1 with
    probability 1/4, 1/2, 1/4), so the interval is [0, 1]; one seed alone would give a point."""
    values = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert bootstrap(values) == (0.0, 0.5, 1.0)
    assert bootstrap(values[:1]) == (0.0, 0.0, 0.0)


def test_bootstrap_interval_shrinks_with_more_conditions():
    rng = np.random.default_rng(0)
    small, large = rng.random((2, 16)), rng.random((2, 256))
    width = lambda ci: ci[2] - ci[0]  # noqa: E731
    assert width(bootstrap(large)) < width(bootstrap(small))
    lo, mid, hi = bootstrap(large)
    assert lo <= mid <= hi and abs(mid - 0.5) < 0.05


def test_separation_and_plateau_rules():
    assert separated((0.2, 0.25, 0.3), (0.1, 0.15, 0.19)) == 1
    assert separated((0.1, 0.15, 0.19), (0.2, 0.25, 0.3)) == -1
    assert separated((0.1, 0.15, 0.2), (0.2, 0.25, 0.3)) == 0  # touching intervals: not called
    assert plateaued((0.1, 0.22, 0.3), (0.2, 0.25, 0.3))  # 0.22 inside [0.2, 0.3]
    assert not plateaued((0.1, 0.15, 0.2), (0.2, 0.25, 0.3))  # still rising


def test_the_verdict_names_the_best_oft_row_its_margins_and_whether_it_wins():
    def row(method, lo, mid, hi, task="canny"):
        return dict(task=task, method=method, final=(lo, mid, hi))

    found = [
        row("oft_control", 0.10, 0.15, 0.20),
        row("oft_unshuffle", 0.30, 0.35, 0.40),
        row("controlnet", 0.10, 0.17, 0.25),
        row("t2i_adapter", 0.25, 0.29, 0.33),
        row("oft_control", 0.4, 0.5, 0.6, "segmentation"),
        row("controlnet", 0.1, 0.2, 0.3, "segmentation"),
    ]
    canny, segmentation = report.verdict(found)
    assert "OFT-Control, unshuffle encoder 0.350 [0.300, 0.400]" in canny  # the best OFT row, not the default
    assert "ControlNet +0.180 (above)" in canny and "T2I-Adapter +0.060 (overlaps)" in canny
    assert canny.endswith("no win: not above every peer, separated.")
    assert "ControlNet +0.300 (above)" in segmentation and segmentation.endswith("; it wins.")


# ------------------------------------------------------------------------------------------------ grid rule
def test_next_lr_extends_only_at_an_edge():
    f = math.sqrt(10)
    assert race.next_lr({1e-4: 0.1, 1e-3: 0.3, 1e-2: 0.2}, f) is None  # best inside
    assert race.next_lr({1e-4: 0.1, 1e-3: 0.2, 1e-2: 0.3}, f) == pytest.approx(1e-2 * f)  # best at the top
    assert race.next_lr({1e-4: 0.3, 1e-3: 0.2, 1e-2: 0.1}, f) == pytest.approx(1e-4 / f)  # best at the bottom
    assert race.next_lr({1e-4: 0.3, 1e-3: 0.3, 1e-2: 0.1}, f) == pytest.approx(1e-4 / f)  # tie: the lower lr


def _race(protocol: race.Protocol, tmp_path: Path) -> race.Race:
    args = type(
        "Args", (), {"model_path": None, "data_root": None, "threads": 1, "inline": True, "jobs": 1}
    )()
    return race.Race(protocol, tmp_path, args)


def test_selection_extends_the_grid_until_the_best_is_inside(tmp_path):
    """Scores rising with lr up to 1e-2: the grid (1e-4, 1e-3, 1e-2) grows to 1e-2 * sqrt 10, whose lower score
    puts the best inside; every lr trains the reported horizon and schedule (seed 0, in folders of their own);
    then the reported runs (every seed) and the adapter-lr check (one lr, adapter at lr / f and lr * f, at
    adapter_steps) follow at 1e-2."""
    protocol = race.Protocol(tasks=("canny",), grid=(1e-4, 1e-3, 1e-2))
    r = _race(protocol, tmp_path)
    first = [run for run in r.first_runs() if run.method == "lora"]
    assert [run.lr for run in first] == [1e-4, 1e-3, 1e-2]
    assert {(run.phase, run.steps, run.eval_every, run.seed) for run in first} == {("horizon", 3000, 3000, 0)}
    assert {run.name.split("/")[0] for run in first} == {"horizon"}
    score = {1e-4: 0.1, 1e-3: 0.2, 1e-2: 0.3}
    assert r.finished(first[0], score[1e-4]) == [] and r.finished(first[1], score[1e-3]) == []
    (extension,) = r.finished(first[2], score[1e-2])
    assert extension.phase == "horizon" and extension.lr == pytest.approx(1e-2 * math.sqrt(10))
    following = r.finished(extension, 0.25)
    row = r.rows[("canny", "lora")]
    assert row.chosen == 1e-2 and not row.at_edge
    reports = [run for run in following if run.phase == "report"]
    assert [run.seed for run in reports] == list(protocol.seeds) and {run.steps for run in reports} == {3000}
    checks = [run for run in following if run.phase == "adapter"]
    assert {(run.lr, run.steps) for run in checks} == {(1e-2, protocol.adapter_steps)}
    assert [run.adapter_lr for run in checks] == pytest.approx(
        [None, 1e-2 / math.sqrt(10), 1e-2 * math.sqrt(10)]
    )


def test_fewer_selection_steps_scale_the_schedule_in_folders_apart_from_the_horizons(tmp_path):
    r = _race(race.Protocol(tasks=("canny",), select_steps=300), tmp_path)
    first = [run for run in r.first_runs() if run.method == "controlnet"]
    assert {(run.phase, run.steps, run.eval_every) for run in first} == {("select", 300, 300)}


def test_a_finished_run_is_reused_only_under_its_own_config(tmp_path, monkeypatch):
    """A resumed race keeps a finished run whose record matches it; a folder recorded under another config
    (e.g. an earlier protocol's steps) is trained again, not mistaken for this run."""
    protocol = race.Protocol(tasks=("canny",), grid=(1e-4, 1e-3, 1e-2))
    r = _race(protocol, tmp_path)
    launched = []
    monkeypatch.setattr(
        r, "first_runs", lambda: [run for run in race.Race.first_runs(r) if run.method == "lora"]
    )
    monkeypatch.setattr(r, "launch", lambda run: launched.append(run.name) or True)
    monkeypatch.setattr(r, "done", lambda run, seconds, failed=False: [])
    same, other = (race.Run("canny", "lora", lr, 0, "horizon", 3000, 3000) for lr in (1e-4, 1e-3))
    for run, steps in ((same, 3000), (other, 300)):
        (tmp_path / run.name).mkdir(parents=True)
        record = {**vars(run), "steps": steps, "seconds": 1.0, "failed": False}
        (tmp_path / run.name / "race_run.json").write_text(json.dumps(record))
    r.run_all()
    assert same.name not in launched and other.name in launched and len(launched) == 2


def test_a_diverged_lr_trial_scores_minus_infinity_and_the_race_goes_on(tmp_path, monkeypatch):
    """A selection run that fails (e.g. non-finite losses at a large lr) is the worst of its grid; a reported
    run that fails stops the race."""
    assert race.next_lr({1e-4: 0.1, 1e-3: 0.3, 1e-2: -math.inf}, math.sqrt(10)) is None

    def diverge(overrides, folder):
        raise FloatingPointError("5 non-finite losses in a row")

    monkeypatch.setattr(race, "train_inline", diverge)
    r = _race(race.Protocol(tasks=("canny",)), tmp_path)
    runs = [run for run in r.first_runs() if run.method == "encoder_only"]
    assert r.launch(runs[2]) is False
    r.rows[("canny", "encoder_only")].scores = {runs[0].lr: 0.1, runs[1].lr: 0.2}
    following = r.done(runs[2], 1.0, failed=True)
    assert r.runs[-1]["score"] == -math.inf and r.runs[-1]["failed"]
    recorded = json.loads((tmp_path / "race.json").read_text())  # after every run: a stopped race reports
    assert recorded["runs"][-1]["dir"] == runs[2].name and recorded["command"].endswith("controllability")
    assert r.rows[("canny", "encoder_only")].chosen == runs[1].lr  # inside: no extension
    assert {run.phase for run in following} == {"report"}
    with pytest.raises(FloatingPointError):
        r.launch(following[0])


def test_a_grid_at_its_extension_limit_is_flagged(tmp_path):
    r = _race(race.Protocol(tasks=("segmentation",), max_extend=1), tmp_path)
    runs = [run for run in r.first_runs() if run.method == "t2i_adapter"]
    for i, run in enumerate(runs):
        following = r.finished(run, 0.1 * i)
    (extension,) = following
    following = r.finished(extension, 1.0)  # the extension is best again: the limit is reached
    row = r.rows[("segmentation", "t2i_adapter")]
    assert row.at_edge and row.chosen == extension.lr
    assert {run.phase for run in following} == {"report"}  # no adapter check off the first task / one group


def test_runs_select_and_report_on_disjoint_shards():
    run = race.Run("canny", "controlnet", 1e-3, 0, "select", 400, 400)
    overrides = run.overrides(race.FULL)
    assert "data.val_shards=${data.root}/${task.condition}/val-000000.tar" in overrides
    assert "method.conditioning_channels=[2,3,10,26]" in overrides  # ControlNet's hint block: the same rule
    reported = race.Run("canny", "lora", 1e-3, 1, "report", 3000, 750).overrides(race.FULL)
    assert "data.val_shards=${data.root}/${task.condition}/val-000001.tar" in reported
    assert not any(o.startswith("method.conditioning_channels") for o in reported)


def test_the_race_configs_are_the_toy_rule():
    rule = race.toy_rule()
    assert rule["encoder_channels"] == [2, 3, 10, 26] and rule["eps"] == pytest.approx(0.1)
    experiment = yaml.safe_load((ROOT / "conf" / "experiment" / "race.yaml").read_text())
    assert experiment["module"]["encoder_channels"] == rule["encoder_channels"]
    assert experiment["data"]["prepare"]["train_scenes"] >= 16_000
    preset = yaml.safe_load((ROOT / "conf" / "oft" / "toy_paper.yaml").read_text())
    assert preset["eps"] == pytest.approx(rule["eps"])


def test_runs_a_finished_run_makes_due_jump_the_queue():
    """A row's extension, reports and adapter checks go ahead of rows not yet started (reports first), so a
    race stopped part-way leaves whole rows."""
    from collections import deque

    queue = deque([race.Run("canny", "lora", 1e-3, 0, "horizon", 3000, 3000)])
    report_run = race.Run("canny", "t2i_adapter", 1e-3, 1, "report", 3000, 1000)
    adapter_run = race.Run("canny", "t2i_adapter", 1e-3, 0, "adapter", 300, 300, 1e-2)
    extension = race.Run("canny", "oft_control", 1e-4, 0, "horizon", 3000, 3000)
    race.Race.enqueue(queue, [report_run, adapter_run])
    race.Race.enqueue(queue, [extension])
    assert [(run.method, run.phase) for run in queue] == [
        ("oft_control", "horizon"),
        ("t2i_adapter", "report"),
        ("t2i_adapter", "adapter"),
        ("lora", "horizon"),
    ]


def test_the_benchmark_code_is_at_most_half_its_former_size():
    lines = sum(
        len((ROOT / "benchmarks" / f).read_text().splitlines())
        for f in ("controllability.py", "race_report.py")
    )
    assert lines <= 1289 // 2


def test_the_full_protocol_meets_the_issue():
    p = race.FULL
    assert p.steps >= 3000 and len(p.seeds) >= 2 and len(p.grid) >= 3 and p.steps % p.eval_every == 0


# ------------------------------------------------------------------------------------------------ movement
def test_rotation_movement_by_hand():
    """One layer, 2x2 blocks with free entry q: ||Q||_F = sqrt 2 |q|, the plane angle 2 atan |q|, and
    ||R - I||_F = 2 sqrt(2) |sin(angle / 2)| for the rotation by that angle."""
    from src.callbacks.energy import rotation_movement
    from src.oft import OFTConfig, inject_oft, oft_layers

    model = nn.Sequential()
    model.add_module("proj", nn.Linear(4, 3))
    inject_oft(model, OFTConfig(n_blocks=2, target_modules=("proj",), coft=True, eps=0.5))
    ((_, layer),) = oft_layers(model)
    assert layer.block_size == 2 and layer.coft_radius == pytest.approx(0.5 * 4 / math.sqrt(2))
    with torch.no_grad():
        layer.oft_skew.copy_(torch.tensor([[0.5], [-0.25]]))
    moved = rotation_movement(model)
    angle = 2 * math.atan(0.5)
    assert moved["q_norm_max"] == pytest.approx(math.sqrt(2) * 0.5)
    assert moved["q_over_radius_max"] == pytest.approx(math.sqrt(2) * 0.5 / layer.coft_radius)
    assert moved["plane_angle_max_deg"] == pytest.approx(math.degrees(angle))
    distance = lambda a: 2 * math.sqrt(2) * abs(math.sin(a / 2))  # noqa: E731
    assert moved["rotation_distance_max"] == pytest.approx(distance(angle), rel=1e-5)
    assert moved["rotation_distance"] == pytest.approx(
        (distance(angle) + distance(2 * math.atan(0.25))) / 2, rel=1e-5
    )
    assert rotation_movement(nn.Linear(2, 2)) == {}


# ------------------------------------------------------------------------------------------------ --quick
@pytest.fixture(scope="module")
def quick(offline_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``python -m benchmarks.controllability --quick`` (in-process, tiny protocol), README writes recorded."""
    out = tmp_path_factory.mktemp("race-quick")
    writes: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report.readme, "write_section", lambda *a, **k: writes.append("README"))
        result = race.main(["--quick", "--out", str(out)])
    return {**result, "writes": writes, "out": out}


def test_quick_writes_no_readme_and_has_every_row(quick):
    assert quick["writes"] == []
    found = {(r["task"], r["method"]) for r in quick["rows"]}
    assert found == {(t, m) for t, methods in race.ROWS.items() for m in methods}
    assert all(p.is_file() and p.parent == quick["out"] for p in quick["plots"])
    assert (quick["out"] / "race.json").is_file() and (quick["out"] / "report.md").is_file()
    assert not any(run["failed"] for run in quick["race"]["runs"])  # every run trained


def test_an_interrupted_race_reports_only_rows_with_every_seed_and_names_the_rest(quick):
    """A row missing a seed's reported run (a race stopped part-way) is left out of the table and the verdict,
    and named as not reported yet; the verdict says it covers only the rows reported so far."""
    partial = dict(quick["race"])
    dropped = next(r for r in partial["runs"] if r["phase"] == "report" and r["method"] == "t2i_adapter")
    partial["runs"] = [r for r in partial["runs"] if r is not dropped]
    found = report.rows(partial, quick["out"])
    assert (dropped["task"], "t2i_adapter") not in {(r["task"], r["method"]) for r in found}
    assert len(found) == len(quick["rows"]) - 1
    markdown = report.render(partial, found, quick["faithfulness"], [])
    assert (
        f"Not reported yet (the race resumes where it stopped): T2I-Adapter ({dropped['task']})." in markdown
    )
    assert "Over the rows reported so far only." in markdown
    assert "Not reported yet" not in quick["markdown"] and "so far" not in quick["markdown"]


def test_quick_rows_have_ordered_intervals_and_lrs_consistent_with_their_grids(quick):
    protocol = race.QUICK
    for row in quick["rows"]:
        assert row["seeds"] == len(protocol.seeds) and row["conditions"] == 4
        for lo, mid, hi in row["curve"].values():
            assert 0.0 <= lo <= mid <= hi <= 1.0
        assert list(row["curve"]) == [1, 2]
        for lo, mid, hi in (row["chance"], *row["caption"]):
            assert 0.0 <= lo <= mid <= hi <= 1.0
        grid = row["grid"]
        assert row["lr"] in grid and row["inside"] == (grid[0] < row["lr"] < grid[-1])
        selection = dict(row["selection"])
        assert selection[row["lr"]] == max(selection.values())  # the best selection score was chosen
        if not row["inside"]:  # only after the extension the quick protocol allows
            assert len(grid) == len(protocol.grid) + protocol.max_extend
        assert ("| " + row["task"]) in quick["markdown"]
    assert "**at the grid's edge**" in quick["markdown"] or all(r["inside"] for r in quick["rows"])


def test_quick_rotation_movement_only_for_rotations(quick):
    for row in quick["rows"]:
        has = "oft/q_over_radius_max" in row["logged"]
        rotates = race.LEVERS.get(row["method"], (row["method"],))[0] == "oft_control"
        assert has == rotates, row["method"]
        if has:
            assert 0.0 <= row["logged"]["oft/q_over_radius_max"] <= 1.0 + 1e-6  # COFT keeps it inside


def test_quick_faithfulness_table(quick):
    sd15, previous, rule = quick["faithfulness"]
    assert sd15["encoder"] == 1_086_480 and sd15["rotations"] == 13_144_928
    assert rule["encoder_share"] < previous["encoder_share"] / 10
    assert rule["rotation_share"] > previous["rotation_share"]
    assert rule["radius"][0] == pytest.approx(sd15["radius"][0])  # b = 8 on the toy as b = 80 on SD1.5
    assert rule["angle"][0] == pytest.approx(sd15["angle"][0]) and previous["angle"][1] < 11
    assert "largest plane angle COFT allows" in quick["markdown"]


def test_quick_per_condition_files_are_the_logged_metrics_on_disjoint_conditions(quick):
    out, runs = quick["out"], quick["race"]["runs"]
    run = next(r for r in runs if r["phase"] == "report" and r["task"] == "canny")
    record = report.last_conditions(out / run["dir"])
    logged = report.last_metrics(out / run["dir"])
    assert np.mean(record["canny_f1"]) == pytest.approx(logged["val/canny_f1"], abs=1e-6)
    assert np.mean(record["canny_f1_chance"]) == pytest.approx(logged["val/canny_f1_chance"], abs=1e-6)
    for name in ("colour", "shape", "object"):
        assert np.mean(record[f"caption_{name}_acc"]) == pytest.approx(
            logged[f"val/caption_{name}_acc"], abs=1e-6
        )
    select = next(r for r in runs if r["phase"] == "horizon" and r["task"] == "canny")
    chosen = set(report.last_conditions(out / select["dir"])["keys"])
    assert chosen and not chosen & set(record["keys"])  # selection and reported conditions are disjoint
    seg = next(r for r in runs if r["phase"] == "report" and r["task"] == "segmentation")
    assert len(report.last_conditions(out / seg["dir"])["seg_miou"]) == 4


def test_a_lever_row_trains_its_method_with_its_preset():
    run = race.Run("canny", "oft_more_layers", 1e-2, 0, "report", 3000, 1000)
    overrides = run.overrides(race.FULL)
    assert "method=oft_control" in overrides and "oft=toy_more_layers" in overrides
    assert run.name == "report/canny/oft_more_layers/lr0.01_s0"  # its own folder, apart from oft_control's
    assert all(
        "oft=" not in o
        for o in race.Run("canny", "oft_control", 1e-2, 0, "report", 3000, 1000).overrides(race.FULL)
    )

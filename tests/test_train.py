"""The training entry point: configs compose, a run leaves its artefacts, checkpoints resume exactly."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import pytorch_lightning as pl
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from src.models.backbone import BackboneNotFoundError, load_backbone
from src.train import build_run, train

CONF = Path(__file__).resolve().parents[1] / "conf"
TASKS = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("task", TASKS)
def test_every_task_config_composes_and_resolves(config_factory, task):
    cfg = config_factory(f"task={task}")
    assert cfg.task.name == task
    OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=True)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(config_factory, experiment):
    """Experiments that need SD1.5 weights are composed and their components built, not run."""
    from hydra.utils import instantiate

    cfg = config_factory(
        f"experiment={experiment}", "data.train_shards='/data/shards/train-{000000..000009}.tar'"
    )
    resolved = {k: v for k, v in cfg.items() if k != "hydra"}
    OmegaConf.to_container(OmegaConf.create(resolved), resolve=True, throw_on_missing=True)
    oft = instantiate(cfg.oft, _convert_="all")
    assert instantiate(cfg.model).name and oft.target_modules


def test_paper_experiment_has_the_paper_settings(config_factory):
    cfg = config_factory("experiment=paper_canny", "data.train_shards=x.tar")
    assert (cfg.model.name, cfg.model.resolution, cfg.oft.n_blocks, cfg.oft.cayley) == (
        "sd15",
        512,
        4,
        "exact",
    )
    assert (cfg.optim.lr, cfg.data.batch_size, cfg.trainer.devices) == (1e-5, 16, 4)
    assert (cfg.module.sampling.num_inference_steps, cfg.module.sampling.guidance_scale) == (50, 9.0)


def test_override_typo_fails_with_hydras_error(config_factory):
    with pytest.raises(ConfigCompositionException, match="max_stepz"):
        config_factory("trainer.max_stepz=3")


@pytest.mark.parametrize("path", ["/nonexistent/stable-diffusion-v1-5", "someone/not-cached-model"])
def test_sd15_without_weights_fails_fast_in_one_line(config_factory, path, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the backbone check")

    monkeypatch.setattr("src.models.module.load_backbone", no_weights)
    monkeypatch.setattr("src.train.instantiate", _refuse_data_instantiation())
    cfg = config_factory("model=sd15", f"model.path={path}")
    with pytest.raises(BackboneNotFoundError) as err:
        train(cfg)
    message = str(err.value)
    assert "\n" not in message and path in message and "model.path" in message


def _refuse_data_instantiation():
    from hydra.utils import instantiate

    def guarded(node, *args, **kwargs):
        if "_target_" in node and "ShardDataModule" in node._target_:
            raise AssertionError("data was set up before the backbone check")
        return instantiate(node, *args, **kwargs)

    return guarded


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["oft.block_size=48"], "block_size 48 does not divide in_features 32 of layer 'down_blocks.0"),
        (["data=shards", "data.train_shards=/nonexistent/shards/train-*.tar"], "/nonexistent/shards/train-"),
        (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path '/nonexistent/last.ckpt' does not exist"),
        (["trainer.max_steps=-1", "trainer.max_epochs=1"], "lr_scheduler.T_max is -1"),
    ],
)
def test_user_errors_fail_before_weights_load(config_factory, monkeypatch, overrides, message):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the error was found")

    monkeypatch.setattr("src.models.module.load_backbone", no_weights)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        train(config_factory(*overrides))
    assert message in str(err.value)


def test_unknown_task_fails_with_the_available_options(config_factory):
    with pytest.raises(MissingConfigException, match="canny") as err:
        config_factory("task=cany")
    assert "cany" in str(err.value)


def test_fast_dev_run_on_the_defaults(config_factory):
    metrics = train(config_factory("debug=fdr"))
    assert "train/loss" in metrics and torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_short_run_leaves_its_artefacts_and_trains_only_adapters(short_fit):
    """A 4-step run writes checkpoint, TensorBoard events, metrics CSV, a sample grid and the resolved config;
    the frozen backbone is bit-identical to a fresh load and the checkpoint holds only trained tensors."""
    out, run, trained_before = short_fit.out, short_fit.run, short_fit.trained_before
    assert run.trainer.global_step == 4

    fresh = load_backbone(run.module.backbone_spec)
    for name in ("unet", "vae", "text_encoder"):
        frozen = {k: v for k, v in getattr(run.module, name).state_dict().items() if "oft" not in k}
        reference = getattr(fresh, name).state_dict()
        renamed = {k.replace(".base_layer", "").replace(".base", ""): v for k, v in frozen.items()}
        for key, value in reference.items():
            assert torch.equal(renamed[key], value), f"frozen {name}.{key} changed"
    after = run.module.state_dict()
    assert all(not torch.equal(trained_before[k], after[k]) for k in trained_before)

    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(ckpt["state_dict"]) == set(run.module.trainable_names())
    from safetensors import safe_open

    with safe_open(str(out / "weights" / "last.safetensors"), "pt") as weights:
        assert set(weights.keys()) == set(ckpt["state_dict"])
        assert all(torch.equal(weights.get_tensor(k), ckpt["state_dict"][k]) for k in ckpt["state_dict"])
        assert weights.metadata()["global_step"] == "4" and weights.metadata()["backbone"] == "toy"
    assert not any(k.startswith(("vae.", "text_encoder.")) for k in ckpt["state_dict"])
    assert ckpt["optimizer_states"] and ckpt["global_step"] == 4


def test_train_writes_run_directory(short_fit):
    out = short_fit.out
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    header = (out / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "val/loss", "oft/he_drift_max", "oft/rotation_distance"} <= set(header)
    grids = sorted((out / "samples").glob("step_*.png"))
    assert grids
    from PIL import Image

    with Image.open(
        grids[-1]
    ) as grid:  # 8 rows (callbacks.samples.max_images) of condition | generated | target
        assert grid.size == (3 * 64 + 4 * 2, 8 * 64 + 9 * 2)
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.task.name == "canny" and saved.paths.output_dir == str(out)


def test_resume_restores_global_step_and_trained_weights_exactly(short_fit, config_factory, tmp_path):
    ckpt_path = short_fit.out / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt_path, weights_only=True)

    cfg = config_factory("debug=default", "trainer.max_steps=6", output_dir=tmp_path / "second")
    run = build_run(cfg)
    restored = {}

    class CaptureAtStart(pl.Callback):
        def on_train_start(self, trainer, module):
            restored.update(
                step=trainer.global_step, weights={k: v.clone() for k, v in module.state_dict().items()}
            )

    run.trainer.callbacks.append(CaptureAtStart())
    run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=str(ckpt_path), weights_only=True)
    assert restored["step"] == saved["global_step"] == 4
    assert run.trainer.global_step == 6

    other = config_factory(
        "debug=default", "oft=paper", f"ckpt_path={ckpt_path}", output_dir=tmp_path / "third"
    )
    with pytest.raises(ValueError, match="resume with the same model and oft settings"):
        build_run(other)
    for key, value in saved["state_dict"].items():
        assert torch.equal(restored["weights"][key], value), key


def test_checkpoints_keep_the_last_k_plus_last(config_factory, tmp_path):
    """Five checkpoint intervals with K = 2: the two newest step files (.ckpt and .safetensors) plus `last`."""
    out = tmp_path / "run"
    cfg = config_factory(
        "debug=default",
        "trainer.max_steps=10",
        "callbacks.checkpoint.save_top_k=2",
        "~callbacks.samples",
        "~callbacks.controllability",
        "~callbacks.energy",
        output_dir=out,
    )
    assert cfg.callbacks.weights.keep_last == 2
    train(cfg)
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step_000008.ckpt", "step_000010.ckpt"]
    weights = sorted(p.name for p in (out / "weights").glob("*.safetensors"))
    assert weights == ["last.safetensors", "step_000008.safetensors", "step_000010.safetensors"]
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10
    assert config_factory().callbacks.checkpoint.save_top_k == 3  # the default: a few


def test_the_demo_lr_decays_to_zero_over_the_run(config_factory):
    from hydra.utils import instantiate

    cfg = config_factory("trainer.max_steps=20")
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    scheduler = instantiate(cfg.lr_scheduler)(optimizer)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(cfg.optim.lr) and optimizer.param_groups[0]["lr"] == pytest.approx(
        0, abs=1e-12
    )
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))


def test_threads_are_set_for_the_run_and_a_bad_value_is_one_line():
    import torch

    from src.errors import ConfigError
    from src.train import set_threads

    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        set_threads(None)  # torch's default is left as it is
        assert torch.get_num_threads() == 1
        for bad in (0, -2, "two", True):
            with pytest.raises(ConfigError, match=r"threads=.*: give a positive number of torch threads"):
                set_threads(bad)
        for load, expected in ((0.2, 2), (1.3, 1), (7.0, 1)):  # auto: the cores the load leaves free
            with (
                mock.patch("os.cpu_count", return_value=2),
                mock.patch("os.getloadavg", return_value=(load, 0, 0)),
            ):
                set_threads("auto")
            assert torch.get_num_threads() == expected, (load, expected)
    finally:
        torch.set_num_threads(before)


def test_the_run_ends_by_naming_each_metric_beside_its_chance_level():
    from src.callbacks.controllability import controllability_summary

    metrics = {"val/canny_f1": 0.1, "val/canny_f1_chance": 0.04, "val/loss": 0.3, "val/seg_miou": 0.2}
    assert controllability_summary(metrics) == ["val/canny_f1 0.1000 (chance 0.0400, 2.50x)"]
    assert controllability_summary({"val/seg_miou": 0.3, "val/seg_miou_chance": 0.0}) == [
        "val/seg_miou 0.3000 (chance 0.0000)"
    ]

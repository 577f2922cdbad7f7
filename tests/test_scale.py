"""Scaling: memory/speed switches keep the maths, trainer strategies and the SLURM launcher compose right."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from src.models.memory import MemoryOptions
from src.train import build_run

TRAINERS = ["ddp", "fsdp", "slurm"]


def _module(config_factory, *overrides: str):
    torch.manual_seed(0)
    return instantiate(config_factory(*overrides).module)


def _loss_and_grads(module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training loss on a fixed batch, noise and timesteps, and the gradients of the trained tensors."""
    generator = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1,
        "condition": torch.rand(2, 3, 64, 64, generator=generator),
        "caption": ["a cat", ""],
    }
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    with torch.no_grad():  # a non-zero control so the encoder's body gets gradients too
        weight = (
            module.encoder.zero_out.weight
        )  # copy_: normal_ would fill channels-last memory in its own order
        weight.copy_(0.01 * torch.randn(weight.shape, generator=generator))
    torch.manual_seed(1)  # the VAE samples its latent distribution
    loss = module.diffusion_loss(batch, noise=noise, timesteps=torch.tensor([10, 900]))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("switches", "rtol"),
    [
        (("module.memory.gradient_checkpointing=true",), 1e-5),
        (("module.memory.channels_last=true",), 1e-4),  # NHWC convolutions sum in another order
        pytest.param(
            ("module.memory.compile=true", "module.memory.compile_backend=eager"),
            1e-5,
            marks=pytest.mark.slow,
        ),
    ],  # dynamo tracing takes ~20 s on 2 cores
    ids=["checkpointing", "channels_last", "compile"],
)
def test_memory_switches_keep_loss_and_gradients(config_factory, switches, rtol):
    reference = _module(config_factory)
    switched = _module(config_factory, *switches)
    switched.encoder.load_state_dict(reference.encoder.state_dict())  # same init whatever ran before
    reference.train(), switched.train()
    loss, grads = _loss_and_grads(reference)
    loss_switched, grads_switched = _loss_and_grads(switched)
    torch.testing.assert_close(loss_switched, loss, rtol=rtol, atol=0)
    assert set(grads_switched) == set(grads)
    assert any("oft_skew" in n and g.abs().sum() > 0 for n, g in grads_switched.items())
    for name, grad in grads.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(
            grads_switched[name], grad, rtol=0, atol=10 * rtol * scale + 1e-12, msg=name
        )


def test_memory_switches_are_applied(config_factory):
    module = _module(
        config_factory,
        "module.memory.gradient_checkpointing=true",
        "module.memory.channels_last=true",
        "module.memory.compile=true",
        "module.memory.compile_backend=eager",
    )
    assert module.unet.is_gradient_checkpointing
    convs = [
        m for m in (module.unet, module.vae, module.encoder) for m in m.modules() if isinstance(m, nn.Conv2d)
    ]
    assert convs and all(
        c.weight.is_contiguous(memory_format=torch.channels_last)
        for c in convs
        if c.weight.shape[-1] > 1 or c.weight.shape[-2] > 1
    )
    blocks = [m for m in module.unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)


def test_default_module_has_every_switch_off(config_factory):
    module = _module(config_factory)
    assert module.memory == MemoryOptions() and not module.unet.is_gradient_checkpointing


@pytest.mark.parametrize(
    ("options", "message"),
    [(dict(compile_mode="fastest"), "compile_mode 'fastest'"), (dict(compile_backend="nope"), "'nope'")],
)
def test_bad_memory_options_name_the_value_and_the_key(options, message):
    with pytest.raises(ValueError, match=message) as err:
        MemoryOptions(**options)
    assert "module.memory." in str(err.value)


def test_accumulation_and_clipping_run_with_the_switches(config_factory, tmp_path):
    cfg = config_factory(
        "debug=fdr",
        "trainer.accumulate_grad_batches=2",
        "trainer.gradient_clip_val=0.5",
        "module.memory.gradient_checkpointing=true",
        "module.memory.channels_last=true",
    )
    run = build_run(cfg)
    assert (run.trainer.accumulate_grad_batches, run.trainer.gradient_clip_val) == (2, 0.5)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert torch.isfinite(run.trainer.callback_metrics["train/loss"])


def test_bf16_mixed_precision_trains(config_factory):
    run = build_run(config_factory("debug=fdr", "trainer.precision=bf16-mixed"))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert torch.isfinite(run.trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("trainer", TRAINERS)
def test_scale_out_trainers_compose_for_multi_node_and_precision(config_factory, trainer):
    cfg = config_factory(
        f"trainer={trainer}",
        "trainer.num_nodes=4",
        "trainer.devices=8",
        "trainer.precision=16-mixed",
        "trainer.accumulate_grad_batches=4",
    )
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.trainer.precision) == (4, 8, "16-mixed")
    assert (cfg.trainer.accelerator, cfg.trainer.gradient_clip_algorithm) == ("gpu", "norm")
    assert config_factory(f"trainer={trainer}").trainer.precision == "bf16-mixed"


def test_ddp_strategy_settings(config_factory):
    from pytorch_lightning.strategies import DDPStrategy

    strategy = instantiate(config_factory("trainer=ddp").trainer.strategy)
    assert isinstance(strategy, DDPStrategy)
    assert strategy._ddp_kwargs == {
        "find_unused_parameters": False,
        "static_graph": False,
        "gradient_as_bucket_view": True,
        "forward_sync_buffers": False,
    }
    assert strategy._start_method == "popen"
    spawn = instantiate(config_factory("trainer=ddp", "trainer.strategy.start_method=spawn").trainer.strategy)
    assert spawn._start_method == "spawn"  # local multirun sweeps of multi-GPU runs


def test_fsdp_wraps_unet_blocks_only_with_original_parameters(config_factory):
    from pytorch_lightning.strategies import FSDPStrategy

    cfg = config_factory("trainer=fsdp")
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy) and strategy.kwargs["use_orig_params"] is True
    classes = tuple(strategy.kwargs["auto_wrap_policy"]._module_classes)
    module = instantiate(cfg.module)
    wrapped = [name for name, m in module.named_modules() if isinstance(m, classes)]
    assert wrapped and all(name.startswith("unet.") for name in wrapped)  # frozen VAE/text encoder unwrapped
    for layer in module.adapted_layers:  # every rotation lives inside an FSDP unit of the UNet
        assert any(f"unet.{layer}".startswith(f"{unit}.") for unit in wrapped), layer


def test_slurm_trainer_requeues_with_lightning(config_factory):
    from pytorch_lightning.plugins.environments import SLURMEnvironment

    from src.models.checkpoint import AtomicCheckpointIO

    plugins = [instantiate(p) for p in config_factory("trainer=slurm").trainer.plugins]
    slurm = [p for p in plugins if isinstance(p, SLURMEnvironment)]
    assert len(slurm) == 1 and any(isinstance(p, AtomicCheckpointIO) for p in plugins)
    assert slurm[0].auto_requeue and slurm[0].requeue_signal == signal.SIGUSR1


def test_slurm_launcher_composes_to_the_expected_sbatch_script(config_factory, tmp_path, monkeypatch):
    """Run the real launcher up to submission: its executor writes the sbatch script; nothing is submitted."""
    import submitit
    from hydra.core.utils import JobReturn, JobStatus

    cfg = config_factory(
        "hydra/launcher=slurm",
        "trainer=slurm",
        "trainer.num_nodes=2",
        "trainer.devices=4",
        "hydra.launcher.partition=gpu",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    assert {
        k: launcher.params[k] for k in ("nodes", "tasks_per_node", "gpus_per_node", "max_num_timeout")
    } == {"nodes": 2, "tasks_per_node": 4, "gpus_per_node": 4, "max_num_timeout": 0}
    scripts = []

    class Job:
        def results(self):
            return [JobReturn(status=JobStatus.COMPLETED, _return_value=0.1)]

    def capture(executor, function, *args):
        scripts.append(executor._executor._make_submission_file_text("python -m src.train", "uid"))
        return [Job() for _ in args[0]]

    monkeypatch.setattr("submitit.slurm.slurm.shutil.which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    launcher.launch([["oft.block_size=16"], ["oft.block_size=32"]], initial_job_idx=0)
    lines = set(scripts[0].splitlines())
    expected = {
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=gpu",
        "#SBATCH --signal=USR1@120",
        "#SBATCH --requeue",
        "#SBATCH --time=2880",
        "#SBATCH --cpus-per-task=8",
    }
    assert expected <= lines, sorted(lines)
    assert Path(tmp_path / "sweep").is_dir()

"""Methods as a config group (`method=`): each trains, checkpoints, resumes and samples through the same
module, loop and entry points; each is the base model at step 0; each saves in its ecosystem's format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import REPO, STEPS, compose_config, make_trained_run, run_module
from hydra.utils import instantiate

from src.errors import CheckpointError
from src.models.backbone import load_backbone
from src.models.checkpoint import CHECKPOINT_META, check_identity, checkpoint_identity
from src.models.methods import METHODS, OFTControl, save_ecosystem

pytestmark = pytest.mark.usefixtures("one_thread")

METHOD_NAMES = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))
#: methods whose trained tensors are a small part of the model (their checkpoints hold nothing else)
LIGHT = ("oft_control", "encoder_only", "lora", "t2i_adapter")
#: the parts each method registers on the module (the prefixes of its trained tensors)
PARTS = {
    "oft_control": ("encoder.", "unet."),
    "encoder_only": ("encoder.",),
    "lora": ("encoder.", "unet."),
    "full_finetune": ("encoder.", "unet."),
    "controlnet": ("controlnet.",),
    "t2i_adapter": ("adapter.",),
}
#: a short run: 12 steps on the tiny backbone, validation (and a checkpoint) at 6 and 12, cheap sampling
SHORT = (
    "debug=default",
    "model=tiny",
    "trainer.max_steps=12",
    "trainer.val_check_interval=6",
    "data.batch_size=2",
    "data.val_batch_size=2",
    "callbacks.samples.max_images=2",
    "callbacks.controllability.max_images=2",
)


def test_the_group_holds_the_six_methods_and_oft_control_is_the_default():
    assert METHOD_NAMES == sorted(METHODS) == sorted(PARTS)
    assert compose_config().method._target_ == "src.models.methods.OFTControl"
    for name in METHOD_NAMES:
        assert instantiate(compose_config(f"method={name}").method).name == name


def _module(method: str, *overrides: str):
    cfg = compose_config("model=tiny", f"method={method}", *overrides)
    return instantiate(cfg.module, condition="canny"), cfg


def _unet_inputs(module, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    width = module.unet.config.cross_attention_dim
    latents, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, width, generator=g)
    return latents, torch.tensor([1, 999]), text, torch.rand(2, 3, 64, 64, generator=g)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_is_the_base_model_at_step_zero(method):
    """The UNet with the method's control (not switched off: strength 1) equals the base UNet exactly, and
    the method's parameter groups are exactly its trained parameters, under its own registered parts."""
    module, _ = _module(method)
    base = load_backbone(module.backbone_spec).unet
    latents, t, text, condition = _unet_inputs(module)
    with torch.no_grad(), module.method.inject(module.unet, condition):
        controlled = module.unet(latents, t, encoder_hidden_states=text).sample
    assert torch.equal(controlled, base(latents, t, encoder_hidden_states=text).sample)

    names = module.trainable_names()
    assert names and all(n.startswith(PARTS[method]) for n in names)
    grouped = [p for group in module.method.param_groups() for p in group["params"]]
    assert sorted(map(id, grouped)) == sorted(map(id, module.trainable_parameters()))
    assert not any(p.requires_grad for p in (*module.vae.parameters(), *module.text_encoder.parameters()))


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_learns_its_control_in_one_step(method):
    """One optimizer step on a batch changes the controlled prediction (the control is trainable; T2I-Adapter's
    zero features and ControlNet's zero convolutions included) and leaves the frozen tensors as they were."""
    module, _ = _module(method, "optim.lr=1e-2")
    optimizer = module.configure_optimizers()["optimizer"]
    latents, t, text, condition = _unet_inputs(module)
    frozen = {k: v.clone() for k, v in module.state_dict().items() if k not in set(module.trainable_names())}

    def predict():
        with module.method.inject(module.unet, condition):
            return module.unet(latents, t, encoder_hidden_states=text).sample

    before = predict()
    torch.nn.functional.mse_loss(before, torch.randn_like(before)).backward()
    optimizer.step()
    module.method.after_optimizer_step()
    with torch.no_grad():
        assert (predict() - before).abs().max() > 1e-6
    after = module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())


@pytest.mark.parametrize("method", ["oft_control", "controlnet", "t2i_adapter"])
def test_adapter_lr_is_its_own_parameter_group(method):
    """`optim.lr` for what reads the condition, `method.adapter_lr` for the rest (default: the same)."""
    module, _ = _module(method, "optim.lr=1e-3", "method.adapter_lr=3e-2", "lr_scheduler=null")
    groups = {g["name"]: g["lr"] for g in module.configure_optimizers().param_groups}
    expected = {
        "oft_control": {"encoder": 1e-3, "adapter": 3e-2},
        "controlnet": {"encoder": 1e-3, "adapter": 3e-2},
    }
    assert groups == expected.get(method, {"adapter": 3e-2})
    default, _ = _module(method, "optim.lr=1e-3", "lr_scheduler=null")
    one = default.configure_optimizers().param_groups  # one group, as before methods: old runs resume
    assert len(one) == 1 and one[0]["lr"] == 1e-3 and one[0]["params"] == default.trainable_parameters()


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_memory_switches_apply_to_every_method(method):
    module, _ = _module(
        method, "module.memory.gradient_checkpointing=true", "module.memory.channels_last=true"
    )
    assert module.unet.is_gradient_checkpointing
    if method == "controlnet":
        assert module.controlnet.is_gradient_checkpointing
    latents, t, text, condition = _unet_inputs(module)
    with module.method.inject(module.unet, condition):
        module.unet(latents, t, encoder_hidden_states=text).sample.square().mean().backward()
    assert any(p.grad is not None for p in module.trainable_parameters())


# ------------------------------------------------------------------------------------- train, resume, sample
@pytest.fixture(scope="module")
def trained(tmp_path_factory, offline_cache):
    """`{method: run directory}` of a 12-step `src.train.train` run per method, made on first request."""
    from src.train import train

    runs: dict[str, Path] = {}

    def run(method: str) -> Path:
        if method not in runs:
            out = tmp_path_factory.mktemp(method) / "run"
            metrics = train(compose_config(*SHORT, f"method={method}", output_dir=out))
            assert torch.isfinite(torch.tensor(metrics["train/loss"]))
            assert "val/canny_f1" in metrics  # the same controllability callback validated it
            runs[method] = out
        return runs[method]

    return run


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_trains_checkpoints_resumes_and_samples(method, trained, tmp_path):
    """12 steps through `src.train`: checkpoints at 6 and 12 hold only the trained tensors (loadable with
    weights_only=True) and the method in their identity; resuming from step 6 starts at step 6 with equal
    trained tensors and runs to 12; `python -m src.generate`'s `generate` samples from the run directory."""
    from src.generate import generate
    from src.train import build_run

    out = trained(method)
    ckpt = torch.load(out / "checkpoints" / "step_000006.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt[CHECKPOINT_META]["method"]["name"] == method
    assert ckpt["state_dict"] and all(k.startswith(PARTS[method]) for k in ckpt["state_dict"])
    if method in LIGHT:  # no frozen weight in the file
        assert all(
            "encoder." in k or "oft_" in k or "lora_" in k or k.startswith("adapter.")
            for k in ckpt["state_dict"]
        )
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12

    cfg = compose_config(
        *SHORT,
        f"method={method}",
        f"ckpt_path={out / 'checkpoints' / 'step_000006.ckpt'}",
        "~callbacks.samples",
        "~callbacks.controllability",
        output_dir=tmp_path / "resumed",
    )
    run = build_run(cfg)
    restored = {}

    class CaptureAtStart(pl.Callback):
        def on_train_start(self, trainer, module):
            state = {k: v.clone() for k, v in module.trained_state_dict().items()}
            restored.update(step=trainer.global_step, state=state)

    run.trainer.callbacks.append(CaptureAtStart())
    run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    assert restored["step"] == 6 and run.trainer.global_step == 12
    assert restored["state"].keys() == ckpt["state_dict"].keys()
    differ = [k for k, v in ckpt["state_dict"].items() if not torch.equal(restored["state"][k], v)]
    assert not differ, f"{len(differ)} trained tensors differ after resuming, e.g. {differ[:3]}"

    gen = compose_config(
        f"run={out}",
        f"condition={_shards(cfg)}",
        "limit=2",
        f"sampling.num_inference_steps={STEPS}",
        name="generate",
        output_dir=tmp_path / "generated",
    )
    record = generate(gen)
    assert len(record["images"]) == 2 and (tmp_path / "generated" / "grid.png").is_file()


def _shards(cfg) -> str:
    return str(Path(cfg.data.root) / "canny" / "val-*.tar")


def test_a_run_of_one_method_is_not_resumed_or_loaded_as_another(trained, tmp_path):
    """Resuming a ControlNet checkpoint as LoRA, or loading it under a config that says LoRA, is refused
    before any weights load, in one line naming both methods; the entry point prints it and exits with 2."""
    from omegaconf import OmegaConf

    from src.models.run import load_run
    from src.train import preflight

    ckpt = trained("controlnet") / "checkpoints" / "last.ckpt"
    cfg = compose_config(*SHORT, "method=lora", f"ckpt_path={ckpt}", output_dir=tmp_path / "x")
    with pytest.raises(CheckpointError) as err:
        preflight(cfg)
    message = str(err.value)
    assert "\n" not in message and "method.name 'controlnet'" in message and "'lora'" in message

    moved = tmp_path / "relabelled"
    (moved / "checkpoints").mkdir(parents=True)
    config = OmegaConf.load(trained("controlnet") / "config.yaml")
    config.method = config.module.method = compose_config("model=tiny", "method=lora").method
    OmegaConf.save(config, moved / "config.yaml")
    (moved / "checkpoints" / "last.ckpt").write_bytes(ckpt.read_bytes())
    with pytest.raises(CheckpointError, match="method.name 'controlnet'"):
        load_run(moved)

    done = run_module(
        "src.train", *SHORT, "method=lora", f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path / 'cli'}"
    )
    lines = done.stderr.strip().splitlines()
    assert (
        done.returncode == 2 and lines[-1].startswith("error: ") and "method.name 'controlnet'" in lines[-1]
    )


def test_checkpoints_from_before_methods_are_oft_control_ones(config_factory):
    cfg = config_factory("model=tiny")
    backbone, oft = instantiate(cfg.model), instantiate(cfg.oft, _convert_="all")
    old = checkpoint_identity(backbone, oft, "canny")
    del old["method"]
    check_identity(old, checkpoint_identity(backbone, oft, "canny", OFTControl()), "old.ckpt", "the config")
    lora = instantiate(compose_config("model=tiny", "method=lora").method)
    with pytest.raises(CheckpointError, match="method.name 'oft_control' but the config says 'lora'"):
        check_identity(old, checkpoint_identity(backbone, oft, "canny", lora), "old.ckpt", "the config")


def test_a_run_from_before_methods_loads_as_oft_control(tmp_path, offline_cache):
    """A run directory whose config.yaml has no `method` and whose checkpoint identity names none (written
    before methods existed) is rebuilt as an `oft_control` run."""
    from omegaconf import OmegaConf, open_dict

    from src.models.run import load_run

    out = make_trained_run(tmp_path / "run", "model=tiny")
    config = OmegaConf.load(out / "config.yaml")
    with open_dict(config):
        del config["method"], config.module["method"]
    OmegaConf.save(config, out / "config.yaml")
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    del checkpoint[CHECKPOINT_META]["method"]
    torch.save(checkpoint, out / "checkpoints" / "last.ckpt")
    run = load_run(out)
    assert run.module.method.name == "oft_control"
    assert all(torch.equal(run.module.state_dict()[k], v) for k, v in checkpoint["state_dict"].items())


# ------------------------------------------------------------------------------------- ecosystem formats
@pytest.fixture(scope="module")
def perturbed(tmp_path_factory, offline_cache):
    """`{method: rebuilt run}` with perturbed trained tensors (`helpers.make_trained_run`), made on request."""
    from src.models.run import load_run

    runs = {}

    def run(method: str):
        if method not in runs:
            out = make_trained_run(tmp_path_factory.mktemp(method) / "run", "model=tiny", f"method={method}")
            runs[method] = load_run(out)
        return runs[method]

    return run


def test_controlnet_saves_as_a_diffusers_controlnet(perturbed, tmp_path):
    from diffusers import ControlNetModel

    run = perturbed("controlnet")
    written = save_ecosystem(run, tmp_path)
    assert written == {"controlnet": tmp_path / "controlnet"}
    loaded = ControlNetModel.from_pretrained(tmp_path / "controlnet").eval()
    latents, t, text, condition = _unet_inputs(run.module)
    unet = run.module.unet
    with torch.no_grad():
        down, mid = loaded(latents, t, text, controlnet_cond=condition, return_dict=False)
        stock = unet(
            latents, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
        with run.module.method.inject(unet, condition):
            ours = unet(latents, t, encoder_hidden_states=text).sample
        base = unet(latents, t, encoder_hidden_states=text).sample
    assert torch.equal(ours, stock) and not torch.allclose(ours, base)
    info = json.loads((tmp_path / "method.json").read_text())
    assert info["method"]["name"] == "controlnet" and info["formats"] == {"controlnet": "controlnet"}


def test_t2i_adapter_saves_as_a_diffusers_t2i_adapter(perturbed, tmp_path):
    from diffusers import T2IAdapter

    run = perturbed("t2i_adapter")
    assert save_ecosystem(run, tmp_path) == {"t2i_adapter": tmp_path / "t2i_adapter"}
    loaded = T2IAdapter.from_pretrained(tmp_path / "t2i_adapter").eval()
    latents, t, text, condition = _unet_inputs(run.module)
    unet = run.module.unet
    with torch.no_grad():
        stock = unet(latents, t, text, down_intrablock_additional_residuals=loaded(condition)).sample
        with run.module.method.inject(unet, condition):
            ours = unet(latents, t, encoder_hidden_states=text).sample
        base = unet(latents, t, encoder_hidden_states=text).sample
    assert torch.equal(ours, stock) and not torch.allclose(ours, base)


@pytest.mark.parametrize("method", ["lora", "full_finetune"])
def test_unet_methods_save_a_peft_adapter_or_a_unet_and_the_control_encoder(perturbed, tmp_path, method):
    """LoRA: `PeftModel.from_pretrained(base UNet, peft/)`; full finetuning: `UNet2DConditionModel.
    from_pretrained(unet/)`; both give the trained UNet's outputs, and `control_encoder/` the encoder's."""
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    from src.models.exported import load_control_encoder

    run = perturbed(method)
    written = save_ecosystem(run, tmp_path)
    if method == "lora":
        base = load_backbone(run.module.backbone_spec).unet
        loaded = PeftModel.from_pretrained(base, str(written["peft"])).eval()
    else:
        loaded = UNet2DConditionModel.from_pretrained(written["unet"]).eval()
    latents, t, text, condition = _unet_inputs(run.module)
    with torch.no_grad():
        ours = run.module.unet(latents, t, encoder_hidden_states=text).sample
        theirs = loaded(latents, t, encoder_hidden_states=text).sample
        fresh = load_backbone(run.module.backbone_spec).unet(latents, t, encoder_hidden_states=text).sample
    assert torch.allclose(ours, theirs, atol=1e-6) and not torch.allclose(ours, fresh, atol=1e-4)
    encoder, config = load_control_encoder(written["control_encoder"])
    assert config["condition"] == "canny"
    with torch.no_grad():
        assert torch.equal(encoder(condition), run.module.encoder(condition))


@pytest.mark.parametrize("method", ["oft_control", "encoder_only"])
def test_encoder_methods_save_the_control_encoder(perturbed, tmp_path, method):
    written = save_ecosystem(perturbed(method), tmp_path)
    expected = {"control_encoder"} | ({"peft"} if method == "oft_control" else set())
    assert set(written) == expected and all(path.is_dir() for path in written.values())


@pytest.mark.parametrize("method", ["controlnet", "t2i_adapter", "lora"])
def test_a_run_samples_through_its_method_and_strength_scales_its_control(perturbed, method):
    """What `src.generate`, `src.evaluate` and the app sample with (`load_controlled` + `generate_images`):
    the run's method is the control, so strength 0 is the adapted UNet alone (for ControlNet and T2I-Adapter
    the base model's own pipeline, bit for bit) and strength 1 changes the images."""
    from src.models.inference import generate_images, load_controlled
    from src.models.sampling import SamplingOptions, build_pipeline, make_scheduler

    run = perturbed(method)
    model = load_controlled(run.files.run_dir)
    assert model.encoder is not None and model.encoder.name == method
    condition = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    images = {
        strength: generate_images(
            model, condition, ["a red circle"], SamplingOptions(num_inference_steps=STEPS, strength=strength)
        )[:, 0]
        for strength in (0.0, 1.0)
    }
    assert (images[1.0] - images[0.0]).abs().max() > 1e-3
    if method != "lora":
        base = load_backbone(run.module.backbone_spec)
        ddim = make_scheduler("ddim", base.noise_scheduler.config)
        stock = build_pipeline(base.unet, base.vae, base.text_encoder, base.tokenizer, ddim)
        reference = stock(
            prompt=["a red circle"],
            height=64,
            width=64,
            num_inference_steps=STEPS,
            guidance_scale=9.0,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images
        assert torch.equal(images[0.0], reference.float().clamp(0, 1))


# ------------------------------------------------------------------------------------- sweep
@pytest.mark.slow
def test_a_multirun_over_methods_writes_one_run_each_and_the_summary(tmp_path, offline_cache):
    sweep = tmp_path / "sweep"
    done = run_module(
        "src.train",
        "-m",
        "method=oft_control,controlnet,lora",
        *SHORT,
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "logger=csv",
        f"hydra.sweep.dir={sweep}",
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((sweep / "summary.json").read_text())
    assert [job["status"] for job in summary["jobs"]] == ["COMPLETED"] * 3
    for job, method in zip(summary["jobs"], ("oft_control", "controlnet", "lora"), strict=True):
        assert f"method={method}" in job["overrides"]
        saved = torch.load(sweep / job["dir"] / "checkpoints" / "last.ckpt", weights_only=True)
        assert saved[CHECKPOINT_META]["method"]["name"] == method


@pytest.mark.slow
@pytest.mark.parametrize("method", ["controlnet", "t2i_adapter", "lora", "full_finetune"])
def test_every_method_trains_under_two_process_ddp(method, tmp_path, offline_cache):
    """`trainer=ddp` on two CPU processes with gradient accumulation and checkpointing: every trained tensor
    is used in every step, so DDP needs no unused-parameter search for any method."""
    out = tmp_path / "ddp"
    done = run_module(
        "src.train",
        "debug=default",
        "model=tiny",
        f"method={method}",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.max_steps=2",
        "trainer.accumulate_grad_batches=2",
        "trainer.val_check_interval=4",
        "data.batch_size=4",
        "module.memory.gradient_checkpointing=true",
        "logger=csv",
        "~callbacks.samples",
        f"hydra.run.dir={out}",
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2 and saved[CHECKPOINT_META]["method"]["name"] == method


def test_python_m_src_export_writes_another_methods_ecosystem_and_skips_oft_formats(tmp_path):
    from diffusers import ControlNetModel

    run = make_trained_run(tmp_path / "run", "model=tiny", "method=controlnet")
    result = run_module("src.export", "--run", str(run), "--out_dir", str(tmp_path / "exports"))
    assert result.returncode == 0, result.stderr
    assert (
        "diffusers: skipped: exports OFT-Control runs" in result.stdout
        and "use --formats ecosystem" in result.stdout
    )
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["ecosystem"]
    ControlNetModel.from_pretrained(
        tmp_path / "exports" / "ecosystem" / "controlnet"
    )  # loads with stock diffusers
    named = run_module("src.export", "--run", str(run), "--out_dir", str(tmp_path / "x"), "--formats", "peft")
    errors = [line for line in named.stderr.splitlines() if line.startswith("error")]  # (loading bars aside)
    assert named.returncode == 2 and errors == [
        "error: --formats peft: exports OFT-Control runs (method oft_control) and this run's method is "
        "'controlnet': use --formats ecosystem"
    ]

"""SDXL backbones (`model=sdxl`): the real architecture's OFT layout, the SDXL conditioning against the stock
`StableDiffusionXLPipeline`, the base model at step 0, the VAE's fp32 encoding, refusals, train and resume.

Everything runs on a random-weight, small SDXL-architecture folder the tests build (`src.models.xl`)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from helpers import compose_config, run_module
from hydra.utils import instantiate

from src.errors import ConfigError
from src.models import xl
from src.models.checkpoint import CHECKPOINT_META, read_checkpoint
from src.oft import inject_oft, oft_parameter_count

pytestmark = pytest.mark.usefixtures("one_thread")
RES = 64
CAPTIONS = ["a red circle", ""]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return xl.write_small_folder(tmp_path_factory.mktemp("sdxl") / "small")


def sdxl(folder: Path, *overrides: str) -> tuple[str, ...]:
    return ("model=sdxl", f"model.path={folder}", f"model.resolution={RES}", *overrides)


@pytest.fixture(scope="module")
def module(folder):
    torch.manual_seed(0)
    return instantiate(compose_config(*sdxl(folder)).module, condition="canny").eval()


def stock_pipeline(folder: Path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------ the real architecture
def _preset(name: str):
    return instantiate(compose_config(f"oft={name}").oft, _convert_="all")


def expected_layout(unet_config: dict, block_size=None, n_blocks=None) -> tuple[int, int]:
    """`(layers, rotation DOF)` of the paper targets, counted from the config alone: per transformer block,
    7 layers read the block's width (attn1 q/k/v/out, attn2 q/out, ff.net.0.proj) and 2 the text width."""
    widths = unet_config["block_out_channels"]
    depth = unet_config["transformer_layers_per_block"]
    cross = [t.startswith("CrossAttn") for t in unet_config["down_block_types"]]
    per_level = [
        (1 + 1 + unet_config["layers_per_block"] + 1) * d if c else 0
        for d, c in zip(depth, cross, strict=True)
    ]  # down attentions (layers_per_block) + up attentions (layers_per_block + 1)
    blocks = {w: n for w, n in zip(widths, per_level, strict=True) if n}
    blocks[widths[-1]] += depth[-1]  # the mid block's transformer at the deepest width

    def dof(features: int) -> int:
        b = block_size or features // n_blocks
        return (features // b) * b * (b - 1) // 2

    text = unet_config["cross_attention_dim"]
    layers = 9 * sum(blocks.values())
    total = sum(n * (7 * dof(w) + 2 * dof(text)) for w, n in blocks.items())
    return layers, total


def test_public_sdxl_configs_fit_together():
    configs = xl.full_size_configs()
    unet, text, text_2 = configs["unet"], configs["text_encoder"], configs["text_encoder_2"]
    assert unet["cross_attention_dim"] == text["hidden_size"] + text_2["hidden_size"] == 2048
    assert (
        unet["projection_class_embeddings_input_dim"]
        == 6 * unet["addition_time_embed_dim"] + text_2["projection_dim"]
    )
    assert configs["vae"]["scaling_factor"] == 0.13025 and configs["vae"]["force_upcast"]
    skeleton = xl.meta_unet()
    assert sum(p.numel() for p in skeleton.parameters()) == 2_567_463_684  # SDXL base's 2.6B-parameter UNet


@pytest.mark.parametrize(
    ("preset", "layers", "dof"), [("paper", 630, 162_565_760), ("fast", 630, 13_471_360)]
)
def test_oft_layout_on_the_real_sdxl_unet(preset, layers, dof):
    """The numbers in docs/design.md, from the public config on the meta device, and recomputed by hand."""
    config, oft = xl.full_size_configs()["unet"], _preset(preset)
    skeleton = xl.meta_unet(config)
    assert len(inject_oft(skeleton, oft)) == layers
    assert oft_parameter_count(skeleton) == dof
    assert expected_layout(config, oft.block_size, oft.n_blocks) == (layers, dof)


# ------------------------------------------------------------------------------------ conditioning
def test_text_conditioning_equals_the_stock_pipeline(folder, module):
    pipe = stock_pipeline(folder)
    hidden, extra = module.text_conditioning(CAPTIONS, (RES, 48))
    embeds, _, pooled, _ = pipe.encode_prompt(CAPTIONS, device="cpu", do_classifier_free_guidance=False)
    ids = pipe._get_add_time_ids((RES, 48), (0, 0), (RES, 48), torch.float32, text_encoder_projection_dim=32)
    added = extra["added_cond_kwargs"]
    assert hidden.shape == (2, 77, 64) and torch.equal(hidden, embeds)
    assert torch.equal(added["text_embeds"], pooled)
    assert torch.equal(added["time_ids"], ids.repeat(2, 1))
    assert added["time_ids"][0].tolist() == [RES, 48, 0, 0, RES, 48]


def test_step_zero_loss_is_the_stock_unets(folder, module):
    """At step 0 the module's loss is the plain SDXL UNet's, conditioned as the stock pipeline conditions it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(2, 3, RES, RES, generator=g) * 2 - 1, "caption": CAPTIONS}
    batch["condition"] = torch.rand(2, 3, RES, RES, generator=g)
    noise, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900])
    torch.manual_seed(1)
    with torch.no_grad():
        ours = module.diffusion_loss(batch, noise=noise, timesteps=t)
    pipe = stock_pipeline(folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    torch.manual_seed(1)
    with torch.no_grad():
        latents = vae.encode(batch["image"]).latent_dist.sample() * 0.13025
        embeds, _, pooled, _ = pipe.encode_prompt(CAPTIONS, device="cpu", do_classifier_free_guidance=False)
        ids = pipe._get_add_time_ids((RES, RES), (0, 0), (RES, RES), torch.float32, 32).repeat(2, 1)
        noisy = module.noise_scheduler.add_noise(latents, noise, t)
        cond = {"text_embeds": pooled, "time_ids": ids}
        prediction = unet(noisy, t, encoder_hidden_states=embeds, added_cond_kwargs=cond).sample
    torch.testing.assert_close(ours, torch.nn.functional.mse_loss(prediction, noise), rtol=1e-6, atol=0)


def test_step_zero_generation_is_the_stock_pipelines(folder, module):
    """`module.generate` (our control hook in a StableDiffusionXLPipeline over the adapted components) equals
    stock diffusers' SDXL pipeline over the folder at step 0, same seed and sampler."""
    from diffusers import DDIMScheduler

    condition = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(2))
    ours = module.generate(condition, CAPTIONS, num_inference_steps=2, guidance_scale=5.0)
    pipe = stock_pipeline(folder)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    stock = pipe(
        prompt=CAPTIONS,
        height=RES,
        width=RES,
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert ours.shape == (2, 3, RES, RES)
    torch.testing.assert_close(ours, stock.clamp(0, 1), atol=1e-6, rtol=0)


def test_vae_encodes_in_fp32_under_half_autocast(module):
    """SDXL's VAE (force_upcast) overflows in fp16: under autocast the latents are still the fp32 ones."""
    images = torch.rand(1, 3, RES, RES, generator=torch.Generator().manual_seed(3)) * 2 - 1
    torch.manual_seed(0)
    plain = module.encode_images(images)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = module.encode_images(images)
    assert autocast.dtype == torch.float32 and torch.equal(autocast, plain)


def test_vae_path_replaces_the_vae(folder, tmp_path):
    """`model.vae_path` (e.g. SDXL's fp16-fix VAE) is loaded instead of the folder's `vae/`."""
    from diffusers import AutoencoderKL

    from src.models.tiny import TINY_VAE

    torch.manual_seed(5)
    fixed = AutoencoderKL(**TINY_VAE, scaling_factor=0.13025, force_upcast=False)
    fixed.save_pretrained(tmp_path / "vae-fix")
    spec = instantiate(compose_config(*sdxl(folder, f"model.vae_path={tmp_path / 'vae-fix'}")).model)
    loaded = xl.load_vae(spec, str(folder), {}, {})
    assert not loaded.config.force_upcast
    assert torch.equal(loaded.encoder.conv_in.weight, fixed.encoder.conv_in.weight)


# ------------------------------------------------------------------------------------ refusals
def test_model_sdxl_refuses_a_folder_that_is_not_sdxl(folder, tmp_path):
    from src.train import preflight

    toy = Path(compose_config().model.path)
    with pytest.raises(
        ConfigError, match=rf"model=sdxl needs an SDXL folder .* model.path='{toy}'.*model=sd15"
    ):
        preflight(compose_config("model=sdxl", f"model.path={toy}", output_dir=tmp_path / "a"))
    with pytest.raises(ConfigError, match=rf"is an SDXL folder .* use model=sdxl model.path={folder}"):
        preflight(compose_config("model=sd15", f"model.path={folder}", output_dir=tmp_path / "b"))


def test_sd1_t2i_adapter_is_refused_on_sdxl_before_weights_load(folder, tmp_path):
    from src.train import preflight

    with pytest.raises(ConfigError, match="method=t2i_adapter .* SDXL UNet"):
        preflight(compose_config(*sdxl(folder, "method=t2i_adapter"), output_dir=tmp_path))


def test_controlnet_reads_the_sdxl_added_conditions(folder):
    """ControlNet's copy of the SDXL UNet needs the pooled text and time ids: it gets them through the hook,
    is the base model at step 0, and its residuals reach the UNet once its zero convolutions move."""
    torch.manual_seed(0)
    module = instantiate(compose_config(*sdxl(folder, "method=controlnet")).module, condition="canny")
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(2, 3, RES, RES, generator=g) * 2 - 1, "caption": CAPTIONS}
    batch["condition"] = torch.rand(2, 3, RES, RES, generator=g)
    noise, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900])

    def loss(strength: float) -> torch.Tensor:
        torch.manual_seed(1)
        with torch.no_grad(), module.method.inject(module.unet, batch["condition"], strength):
            text, extra = module.text_conditioning(CAPTIONS, (RES, RES))
            latents = module.encode_images(batch["image"])
            return module.unet(module.noise_scheduler.add_noise(latents, noise, t), t, text, **extra).sample

    assert torch.equal(loss(1.0), loss(0.0))
    with torch.no_grad():
        for conv in module.controlnet.controlnet_down_blocks:
            conv.weight.normal_(0, 0.05)
    assert (loss(1.0) - loss(0.0)).abs().max() > 1e-4


@pytest.mark.parametrize("method", ["oft_control", "encoder_only", "lora", "full_finetune", "controlnet"])
def test_every_sdxl_method_is_the_base_at_step_zero_and_gets_gradients(folder, method):
    """Each method SDXL hosts: at step 0 its loss is the frozen UNet's (control off), and one backward reaches
    its encoder (what reads the condition) once the zero layers move."""
    torch.manual_seed(0)
    module = instantiate(compose_config(*sdxl(folder, f"method={method}")).module, condition="canny")
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(2, 3, RES, RES, generator=g) * 2 - 1, "caption": CAPTIONS}
    batch["condition"] = torch.rand(2, 3, RES, RES, generator=g)
    noise, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900])

    def loss() -> torch.Tensor:
        torch.manual_seed(1)
        return module.diffusion_loss(batch, noise=noise, timesteps=t)

    with torch.no_grad():
        controlled = loss()
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:  # the same module, no control installed
        off = lambda self, unet, condition, strength=1.0: contextlib.nullcontext()  # noqa: E731
        patch.setattr(type(module.method), "inject", off)
        plain = loss()
    assert torch.equal(controlled, plain)
    with torch.no_grad():
        for p in module.method.adapter_parameters() + module.method.encoder_parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.01)  # move the zero-initialised layers
    loss().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in module.method.encoder_parameters())


# ------------------------------------------------------------------------------------ train and resume
def test_trains_checkpoints_and_resumes(folder, tmp_path):
    """A few steps write checkpoints with the sdxl identity; a resumed run starts from the saved step and
    tensors and continues."""
    from src.train import train

    common = ("debug=default", "data.batch_size=2", "data.val_batch_size=2", "trainer.val_check_interval=4")
    first = tmp_path / "first"
    train(compose_config(*sdxl(folder, *common, "trainer.max_steps=4"), output_dir=first))
    saved = read_checkpoint(first / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 4 and saved[CHECKPOINT_META]["backbone"] == "sdxl"
    zero_out = saved["state_dict"]["encoder.zero_out.weight"]
    assert zero_out.abs().max() > 0  # trained away from the zero init
    second = tmp_path / "second"
    ckpt = f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}"
    train(compose_config(*sdxl(folder, *common, "trainer.max_steps=6", ckpt), output_dir=second))
    resumed = read_checkpoint(second / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 6
    optimizer_steps = resumed["optimizer_states"][0]["state"][0]["step"]
    assert int(optimizer_steps) == 6  # AdamW's state came from the first run (4) plus 2 steps


@pytest.mark.slow
def test_the_issue_command_trains_checkpoints_and_resumes(folder, tmp_path):
    """`python -m src.train model=sdxl model.path=<small SDXL folder> trainer.max_steps=12`, then a resume."""
    args = (*sdxl(folder), "trainer.accelerator=cpu", "data.batch_size=2", "data.val_batch_size=2")
    args += ("trainer.val_check_interval=6", "trainer.limit_val_batches=1", "sampling.num_inference_steps=2")
    first = run_module("src.train", *args, "trainer.max_steps=12", f"paths.output_dir={tmp_path / 'a'}")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step_000006.ckpt", "step_000012.ckpt"]
    resume = f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}"
    second = run_module(
        "src.train", *args, "trainer.max_steps=14", resume, f"paths.output_dir={tmp_path / 'b'}"
    )
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = read_checkpoint(tmp_path / "b" / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 14 and int(resumed["optimizer_states"][0]["state"][0]["step"]) == 14
    config = json.dumps(read_checkpoint(tmp_path / "a" / "checkpoints" / "last.ckpt")[CHECKPOINT_META])
    assert '"backbone": "sdxl"' in config

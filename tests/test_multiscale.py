"""OFT-Control's multi-scale lever (`method.multiscale=true`): the base model at step 0, one feature per down
block at its resolution, training and sampling from a run, and its refusals."""

from __future__ import annotations

import pytest
import torch
from helpers import STEPS, compose_config, demo_inputs, make_trained_run
from hydra.utils import instantiate

from src.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def module(offline_cache):
    cfg = compose_config("debug=default", "method.multiscale=true")
    return instantiate(cfg.module, condition=cfg.task.condition)


def unet_inputs(module, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, module.unet.config.in_channels, 8, 8, generator=generator)
    text = module.encode_prompts(["a red circle", "a blue square"])
    condition = torch.rand(2, 3, 64, 64, generator=generator)
    return latents, torch.tensor([10, 500]), text, condition


def test_multiscale_is_the_base_model_at_init_and_feeds_every_down_block(module) -> None:
    latents, t, text, condition = unet_inputs(module)
    with torch.no_grad():
        base = module.unet(latents, t, encoder_hidden_states=text).sample
        with module.method.inject(module.unet, condition):
            controlled = module.unet(latents, t, encoder_hidden_states=text).sample
    assert torch.equal(base, controlled)  # every head and the encoder's last convolution start at zero

    features = module.method.pyramid(module.method.encoder.body(condition))
    widths = list(module.unet.config.block_out_channels)
    assert [f.shape[1] for f in features] == widths
    assert [f.shape[-1] for f in features] == [8 // 2**i for i in range(len(widths))]

    # one head perturbed at a time: each changes the output (its block is reached), the others stay zero
    for i, head in enumerate(module.method.pyramid.heads):
        with torch.no_grad():
            head.bias.fill_(0.5)
            with module.method.inject(module.unet, condition):
                moved = module.unet(latents, t, encoder_hidden_states=text).sample
            with module.method.inject(module.unet, condition, strength=0.0):
                off = module.unet(latents, t, encoder_hidden_states=text).sample
            head.bias.zero_()
        assert (moved - base).abs().max() > 1e-4, f"down block {i} is not reached"
        assert torch.equal(off, base)
    names = module.trainable_names()
    assert any(n.startswith("pyramid.heads.") for n in names)
    encoder_group = {id(p) for p in module.method.encoder_parameters()}
    assert all(id(p) in encoder_group for p in module.method.pyramid.parameters())  # lr optim.lr


def test_multiscale_run_trains_samples_and_refuses_what_it_cannot_do(offline_cache, tmp_path) -> None:
    from src.export import export
    from src.models.inference import generate_images, load_controlled
    from src.models.sampling import SamplingOptions
    from src.train import train

    cfg = compose_config("debug=default", "method.multiscale=true", output_dir=tmp_path / "run")
    train(cfg)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    model = load_controlled(tmp_path / "run")
    assert model.encoder.multiscale and any(p.abs().max() > 0 for p in model.encoder.pyramid.parameters())
    item = demo_inputs(1)[0]
    images = generate_images(
        model, item.condition[None], [item.caption], SamplingOptions(num_inference_steps=STEPS)
    )
    assert images.shape == (1, 1, 3, 64, 64)

    with pytest.raises(
        ConfigError, match="--formats diffusers: holds the control encoder alone, without method"
    ):
        export(tmp_path / "run", tmp_path / "export", ["diffusers"])
    assert (export(tmp_path / "run", tmp_path / "export", ["peft"])["peft"] / "adapter_config.json").is_file()
    plain = make_trained_run(tmp_path / "plain")
    with pytest.raises(Exception, match="multiscale"):  # another method identity: never loaded as multiscale
        resume = f"ckpt_path={plain}/checkpoints/last.ckpt"
        train(
            compose_config("debug=default", "method.multiscale=true", resume, output_dir=tmp_path / "resume")
        )
    method = instantiate(compose_config("method.multiscale=true").method)
    with pytest.raises(ConfigError, match="method.multiscale=true reads one condition but task.condition is"):
        method.check_condition("canny+seg")

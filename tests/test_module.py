"""The Lightning module on the tiny backbone: identity at step 0, what trains and what stays frozen."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import compose_config
from hydra.utils import instantiate

from src.models.backbone import load_backbone
from src.models.control import control_injection
from src.models.module import OFTControlModule


def _module(lr: float = 3e-3, preset: str = "fast") -> OFTControlModule:
    cfg = compose_config(f"oft={preset}")
    optimizer = functools.partial(torch.optim.AdamW, lr=lr)
    return OFTControlModule(instantiate(cfg.model), instantiate(cfg.oft, _convert_="all"), optimizer)


def _fixed_batch(seed: int = 0) -> tuple[dict, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {
        "image": torch.rand(4, 3, 64, 64, generator=g) * 2 - 1,
        "condition": torch.rand(4, 3, 64, 64, generator=g),
        "caption": ["a cat on a sofa", "a red rocket", "", "a cup of coffee"],
    }
    return batch, torch.randn(4, 4, 8, 8, generator=g), torch.tensor([100, 300, 500, 700])


@pytest.mark.parametrize("preset", ["fast", "paper"])
def test_controlled_unet_equals_base_unet_at_step_zero(preset):
    module = _module(preset=preset)
    base = load_backbone(module.backbone_spec).unet
    g = torch.Generator().manual_seed(1)
    width = module.unet.config.cross_attention_dim
    latents, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, width, generator=g)
    t = torch.tensor([1, 999])
    with torch.no_grad(), control_injection(module.unet, module.encoder, torch.rand(2, 3, 64, 64)):
        controlled = module.unet(latents, t, text).sample
    assert torch.equal(controlled, base(latents, t, text).sample)
    blocks = sum(type(m).__name__ == "BasicTransformerBlock" for m in base.modules())
    assert blocks == 7 and len(module.adapted_layers) == 9 * blocks  # 9 linear layers per transformer block


def test_only_encoder_and_rotations_are_trainable():
    module = _module()
    names = module.trainable_names()
    assert names and all(n.startswith("encoder.") or ".oft_" in n or "oft" in n.split(".")[-1] for n in names)
    assert not any(p.requires_grad for p in module.vae.parameters())
    assert not any(p.requires_grad for p in module.text_encoder.parameters())
    summary = module.parameter_summary()
    trained = sum(p.numel() for p in module.trainable_parameters())
    assert trained == summary["encoder_params"] + sum(
        p.numel() for n, p in module.unet.named_parameters() if p.requires_grad
    )


def test_overfitting_one_fixed_batch_lowers_loss_and_touches_only_trained_tensors():
    """50 steps on one batch with fixed noise and timesteps: loss drops >= 20%, every trained tensor moves,
    every frozen tensor is bit-identical."""
    module = _module(lr=3e-3)
    trained = set(module.trainable_names())
    before = {k: v.clone() for k, v in module.state_dict().items()}
    optimizer = module.configure_optimizers()
    batch, noise, timesteps = _fixed_batch()
    losses = []
    for _ in range(50):
        torch.manual_seed(0)  # the VAE posterior sample is fixed too
        loss = module.diffusion_loss(batch, noise=noise, timesteps=timesteps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] <= 0.8 * losses[0], losses
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trained


def test_caption_dropout_is_validated_and_applied():
    with pytest.raises(ValueError, match="caption_dropout 1.5"):
        OFTControlModule.__init__(object.__new__(OFTControlModule), None, None, None, caption_dropout=1.5)
    module = _module()
    module.caption_dropout = 1.0
    assert module.drop_captions(["a", "b"]) == ["", ""]
    module.caption_dropout = 0.0
    assert module.drop_captions(["a", "b"]) == ["a", "b"]


@pytest.mark.parametrize("preset", ["fast", "paper"])
def test_coft_keeps_every_block_within_its_radius_while_training(config_factory, preset):
    """Trained by Lightning with a learning rate that throws every rotation far out of its COFT ball in one
    step, the module's projection after each optimizer step brings every block back onto or inside it."""
    from src.oft import oft_layers
    from src.oft.rotation import skew_frobenius_norm
    from src.train import build_run

    overrides = [f"oft={preset}", "optim.lr=0.1", "trainer.max_steps=3", "trainer.limit_val_batches=0"]
    run = build_run(config_factory("debug=default", *overrides))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 3 and run.module.nonfinite_steps == 0
    layers = [layer for _, layer in oft_layers(run.module.unet)]
    assert layers and all(layer.coft_radius is not None for layer in layers)
    ratios = torch.cat([skew_frobenius_norm(layer.oft_skew.detach()) / layer.coft_radius for layer in layers])
    assert ratios.max() <= 1 + 1e-5, (
        f"{int((ratios > 1 + 1e-5).sum())} of {len(ratios)} blocks outside their radius"
    )
    assert ratios.min() > 0.99  # not vacuous: every block was pushed to its radius


def test_cubic_timesteps_favour_noisy_steps_and_bad_names_fail_early():
    from types import SimpleNamespace

    from src.models.module import OFTControlModule

    scheduler = SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000))
    torch.manual_seed(0)
    draws = {
        kind: OFTControlModule.sample_timesteps(
            SimpleNamespace(timestep_sampling=kind, noise_scheduler=scheduler), 20000, torch.device("cpu")
        )
        for kind in ("uniform", "cubic")
    }
    assert all(int(t.min()) >= 0 and int(t.max()) <= 999 for t in draws.values())
    assert abs(draws["uniform"].float().mean().item() - 499.5) < 10
    assert abs(draws["cubic"].float().mean().item() - 750) < 10  # E[1 - u^3] = 3/4
    with pytest.raises(ValueError, match="timestep_sampling 'cubical' is not one of: uniform, cubic"):
        cfg = compose_config()
        OFTControlModule(
            instantiate(cfg.model),
            instantiate(cfg.oft, _convert_="all"),
            torch.optim.AdamW,
            timestep_sampling="cubical",
        )

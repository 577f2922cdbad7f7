"""Config validation, injection, state-dict io, COFT during training, peft equivalence, SD1.5 counts."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import compose_config
from torch import nn

from src.oft import (
    OFTConfig,
    OFTLinear,
    inject_oft,
    load_oft_state_dict,
    merge_oft,
    oft_layers,
    oft_parameter_count,
    oft_parameters,
    oft_state_dict,
    project_coft_,
)
from src.oft.peft_compat import peft_oft_config
from src.oft.rotation import skew_frobenius_norm

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny ops: one thread, no OpenMP contention

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(seed: int = 0) -> nn.Module:
    """Qualified names like a UNet's: 'down.0.attn1.to_q' etc., plus a conv that is not targeted."""
    torch.manual_seed(seed)
    attn = nn.ModuleDict(
        {"to_q": nn.Linear(16, 16), "to_k": nn.Linear(16, 16), "to_out": nn.Sequential(nn.Linear(16, 8))}
    )
    return nn.ModuleDict(
        {"down": nn.ModuleList([nn.ModuleDict({"attn1": attn})]), "conv_in": nn.Conv2d(4, 4, 3)}
    ).double()


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    attn = model["down"][0]["attn1"]
    return attn["to_out"](torch.tanh(attn["to_q"](x)) * attn["to_k"](x))


CONFIG = {"n_blocks": 2, "target_modules": [r".*attn1\.(to_q|to_k|to_out\.0)"]}


# --- config validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"block_size": 32, "n_blocks": 4}, "exactly one of block_size (32) and n_blocks (4)"),
        ({}, "exactly one of block_size (None) and n_blocks (None)"),
        ({"n_blocks": 4, "cayley": "qr"}, "cayley 'qr' is not one of ('exact', 'neumann')"),
        ({"block_size": 1}, "block_size 1 must be an integer >= 2"),
        ({"n_blocks": 4, "neumann_terms": 0}, "neumann_terms 0 must be an integer >= 1"),
        ({"n_blocks": 4, "coft": True, "eps": -1.0}, "eps -1.0 must be a positive finite number"),
        (
            {"n_blocks": 4, "target_modules": ["to_q("]},
            "target_modules pattern 'to_q(' is not a valid regular",
        ),
    ],
)
def test_config_validation_messages(kwargs, message):
    with pytest.raises(ValueError) as err:
        OFTConfig(**kwargs)
    assert message in str(err.value)


def test_from_dict_accepts_hydra_style_and_rejects_unknown_fields():
    config = OFTConfig.from_dict({"_target_": "src.oft.OFTConfig", "block_size": 8, "target_modules": "x"})
    assert config.block_size == 8 and config.target_modules == ["x"]
    assert OFTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown OFTConfig field\(s\) \['rank'\]"):
        OFTConfig.from_dict({"rank": 4})


def test_nothing_matched_quotes_patterns_and_examples():
    model = tiny_model()
    with pytest.raises(ValueError) as err:
        inject_oft(model, OFTConfig(n_blocks=2, target_modules=["to_q"]))  # fullmatch: needs '.*to_q'
    message = str(err.value)
    assert "['to_q']" in message and "re.fullmatch" in message and "'down.0.attn1.to_q'" in message
    assert not list(oft_layers(model))


def test_non_dividing_layer_is_named_and_model_left_untouched():
    model = tiny_model()
    with pytest.raises(
        ValueError, match=r"n_blocks 3 does not split in_features 16 of layer 'down.0.attn1.to_q'"
    ):
        inject_oft(model, OFTConfig(n_blocks=3, target_modules=[".*to_(q|k)"]))
    assert not list(oft_layers(model))


# --- injection, counts, state dict ------------------------------------------------------------


def test_inject_targets_exclude_and_counts():
    model = tiny_model()
    config = OFTConfig(block_size=4, target_modules=[".*attn1\\..*", "conv_in"], exclude_modules=[".*to_k"])
    names = inject_oft(model, config)
    assert names == ["down.0.attn1.to_q", "down.0.attn1.to_out.0", "conv_in"]
    assert type(model["down"][0]["attn1"]["to_k"]) is nn.Linear
    # b(b-1)/2 = 6 free entries per block: to_q and to_out.0 have 16/4 blocks, conv_in 4*3*3/4 = 9
    assert oft_parameter_count(model) == (4 + 4 + 9) * 6


def test_parameter_count_formula_and_block_share():
    for share, per_layer in [(False, 2 * 8 * 7 // 2), (True, 8 * 7 // 2)]:
        model = tiny_model()
        inject_oft(model, OFTConfig(**CONFIG, block_share=share))  # to_q, to_k: in 16; to_out.0: in 16
        assert oft_parameter_count(model) == 3 * per_layer
        assert all(p.requires_grad for p in oft_parameters(model))


def test_state_dict_roundtrip_into_fresh_model(tmp_path):
    x = torch.randn(4, 16, dtype=torch.float64)
    trained = tiny_model()
    inject_oft(trained, OFTConfig(**CONFIG))
    with torch.no_grad():
        for p in oft_parameters(trained):
            p.normal_()
    state = oft_state_dict(trained)
    assert sorted(state) == [
        "down.0.attn1.to_k.oft_skew",
        "down.0.attn1.to_out.0.oft_skew",
        "down.0.attn1.to_q.oft_skew",
    ]
    from safetensors.torch import load_file, save_file

    save_file(state, tmp_path / "oft.safetensors")
    fresh = tiny_model()
    inject_oft(fresh, OFTConfig(**CONFIG))
    assert not torch.allclose(run(fresh, x), run(trained, x))
    load_oft_state_dict(fresh, load_file(tmp_path / "oft.safetensors"))
    assert torch.equal(run(fresh, x), run(trained, x))


def test_state_dict_errors_list_every_problem():
    model = tiny_model()
    inject_oft(model, OFTConfig(**CONFIG))
    state = oft_state_dict(model)
    del state["down.0.attn1.to_k.oft_skew"]
    state["down.0.attn1.to_v.oft_skew"] = torch.zeros(2, 28)
    state["down.0.attn1.to_q.oft_skew"] = torch.zeros(4, 6)
    before = copy.deepcopy(oft_state_dict(model))
    with pytest.raises(ValueError) as err:
        load_oft_state_dict(model, state)
    message = str(err.value)
    assert "missing keys ['down.0.attn1.to_k.oft_skew']" in message
    assert "unexpected keys ['down.0.attn1.to_v.oft_skew']" in message
    assert "down.0.attn1.to_q.oft_skew: checkpoint (4, 6) vs model (2, 28)" in message
    assert all(torch.equal(before[k], v) for k, v in oft_state_dict(model).items())  # nothing loaded


# --- COFT during training ---------------------------------------------------------------------


def _train(project: bool, steps: int = 5) -> tuple[nn.Module, dict]:
    model = tiny_model()
    bases = {k: v.clone() for k, v in model.state_dict().items()}
    inject_oft(model, OFTConfig(**CONFIG, coft=True, eps=1e-3))
    optimizer = torch.optim.SGD(oft_parameters(model), lr=50.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, target = (
            torch.randn(32, 16, generator=gen, dtype=torch.float64),
            torch.randn(32, 8, generator=gen, dtype=torch.float64),
        )
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(run(model, x), target).backward()
        optimizer.step()
        if project:
            project_coft_(model)
    return model, bases


@pytest.mark.parametrize("project", [True, False])
def test_coft_keeps_blocks_within_radius(project):
    model, bases = _train(project)
    radius = 1e-3 * 8**2 / math.sqrt(2)  # official convention: eps * b^2 / sqrt(n_blocks)
    norms = torch.cat([skew_frobenius_norm(layer.oft_skew) for _, layer in oft_layers(model)])
    assert all(layer.coft_radius == pytest.approx(radius) for _, layer in oft_layers(model))
    assert (norms > 0).all()
    if project:
        assert (norms <= radius * (1 + 1e-12)).all()
    else:  # the test can fail: the same steps without projection leave the ball
        assert (norms > radius).any()
    merged = merge_oft(model)
    assert merged  # frozen bases untouched by training
    for name, layer in merged.items():
        assert torch.equal(layer.base.weight, bases[f"{name}.weight"]) and not layer.base.weight.requires_grad


# --- peft as an independent reference ----------------------------------------------------------


@pytest.mark.parametrize("share", [False, True])
def test_linear_matches_peft_oft_exact_cayley(share):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 8)).double()
    config = OFTConfig(block_size=8, block_share=share, target_modules=["0", "2"])
    ours = copy.deepcopy(base)
    inject_oft(ours, config)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_oft_config(config))
    x = torch.randn(10, 32, dtype=torch.float64)
    assert torch.allclose(ours(x), theirs(x), atol=1e-12)
    with torch.no_grad():
        for name, layer in oft_layers(ours):
            layer.oft_skew.normal_(std=0.3)
            # same layout: strict upper triangle, row-major; peft applies x @ R_peft = (R_peft^T x), and
            # R_peft^T = ((I - Q)(I + Q)^-1)^T = (I + Q)(I - Q)^-1: our orientation with the same Q
            theirs.base_model.model.get_submodule(name).oft_R["default"].weight.copy_(layer.oft_skew)
    out = ours(x)
    assert (out - base(x)).abs().max() > 1e-2
    assert torch.allclose(out, theirs(x), atol=1e-10)


# --- SD1.5 UNet with the Hydra presets ---------------------------------------------------------


def preset(name: str) -> OFTConfig:
    from hydra.utils import instantiate

    return instantiate(compose_config(f"oft={name}").oft)


@pytest.fixture(scope="module")
def meta_unet():
    diffusers = pytest.importorskip("diffusers")
    config = json.loads((ROOT / "src/models/sd15/unet_config.json").read_text())
    with torch.device("meta"):  # shapes only: counting does not need weights
        return diffusers.UNet2DConditionModel(**config)


def test_presets_compose():
    paper, fast = preset("paper"), preset("fast")
    assert isinstance(paper, OFTConfig) and isinstance(fast, OFTConfig)
    assert (paper.n_blocks, paper.block_size, paper.cayley, paper.coft, paper.eps) == (
        4,
        None,
        "exact",
        True,
        1e-3,
    )
    assert (fast.n_blocks, fast.block_size, fast.cayley) == (None, 32, "neumann")
    assert fast.target_modules == paper.target_modules


@pytest.mark.parametrize("n_blocks, millions", [(4, 13.14), (2, 26.35), (8, 6.54), (16, 3.24)])
def test_paper_preset_on_sd15_unet(meta_unet, n_blocks, millions):
    unet = copy.deepcopy(meta_unet)
    config = preset("paper")
    config.n_blocks = n_blocks
    names = inject_oft(unet, config)
    assert len(names) == 144
    blocks = {name.rsplit(".attn", 1)[0].rsplit(".ff.", 1)[0] for name in names}
    assert len(blocks) == 16 and all(sum(n.startswith(b + ".") for n in names) == 9 for b in blocks)
    count = oft_parameter_count(unet)
    assert round(count / 1e6, 2) == millions  # the official README's table
    if n_blocks == 4:
        assert count == 13_144_928


def test_fast_preset_on_sd15_unet(meta_unet):
    unet = copy.deepcopy(meta_unet)
    names = inject_oft(unet, preset("fast"))
    assert len(names) == 144
    assert all(layer.block_size == 32 and isinstance(layer, OFTLinear) for _, layer in oft_layers(unet))


def test_more_layers_preset_adds_each_blocks_ff_output_and_projections(meta_unet):
    unet = copy.deepcopy(meta_unet)
    base_shapes = {
        name: module.weight.shape for name, module in unet.named_modules() if hasattr(module, "weight")
    }
    more = preset("more_layers")
    names = inject_oft(unet, more)
    assert len(names) == 192
    paper_names = inject_oft(copy.deepcopy(meta_unet), preset("paper"))
    extra = sorted(set(names) - set(paper_names))
    assert set(paper_names) < set(names) and len(extra) == 48  # 16 blocks' ff.net.2, proj_in and proj_out
    assert {name.rsplit(".", 1)[-1] for name in extra} == {"2", "proj_in", "proj_out"}
    # independently, from the base layers' shapes: r = 4 blocks of b = d / 4 rotated features, b(b-1)/2 each
    rotated = [math.prod(base_shapes[name][1:]) for name in names]
    expected = sum(4 * (d // 4) * (d // 4 - 1) // 2 for d in rotated)
    assert oft_parameter_count(unet) == expected == 40_985_888
    toy = preset("toy_more_layers")
    assert toy.target_modules == more.target_modules and (toy.eps, more.eps) == (0.1, 1e-3)


# ------------------------------------------------------------------------------------- batched rotations
def _mixed_model(config: OFTConfig, seed: int = 0) -> nn.Module:
    """Linear layers of three widths and a conv (two block sizes with n_blocks=2), trained-looking skews."""
    torch.manual_seed(seed)
    model = nn.ModuleDict(
        {
            "a": nn.Linear(8, 8),
            "b": nn.Linear(8, 16),
            "c": nn.Linear(16, 8),
            "d": nn.Conv2d(2, 4, 2),
        }
    )
    inject_oft(model, config)
    with torch.no_grad():
        for p in oft_parameters(model):
            p.normal_(0, 0.3)
    return model


def _outputs_and_grads(model: nn.Module, batched: bool) -> tuple[list, list]:
    from contextlib import nullcontext

    from src.oft import batched_rotations

    g = torch.Generator().manual_seed(1)
    x, image = torch.randn(3, 8, generator=g), torch.randn(1, 2, 5, 5, generator=g)
    model.zero_grad()
    with batched_rotations(model) if batched else nullcontext():
        outputs = [model["c"](model["b"](model["a"](x))), model["d"](image)]
    sum(o.square().sum() for o in outputs).backward()
    return [o.detach() for o in outputs], [p.grad.clone() for p in oft_parameters(model)]


@pytest.mark.parametrize(
    "config",
    [
        OFTConfig(n_blocks=2, target_modules=[".*"]),
        OFTConfig(n_blocks=2, block_share=True, target_modules=[".*"]),
        OFTConfig(block_size=4, cayley="neumann", neumann_terms=4, target_modules=[".*"]),
    ],
    ids=["exact", "shared", "neumann"],
)
def test_batched_rotations_give_the_per_layer_outputs_and_gradients(config):
    model = _mixed_model(config)
    sizes = {layer.block_size for _, layer in oft_layers(model)}
    assert len(sizes) > 1 or config.block_size  # several groups where block sizes differ
    ours, our_grads = _outputs_and_grads(model, batched=True)
    reference, reference_grads = _outputs_and_grads(model, batched=False)
    for a, b in zip(ours + our_grads, reference + reference_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(layer.batched is None for _, layer in oft_layers(model))  # nothing kept after the block


def test_batched_rotations_are_released_on_error_and_scaled_rotations_bypass_them():
    from src.oft import batched_rotations

    model = _mixed_model(OFTConfig(n_blocks=2, target_modules=[".*"]))
    layer = model["a"]
    with pytest.raises(RuntimeError, match="inside"), batched_rotations(model):
        assert layer.batched is not None and layer.rotation() is layer.batched
        half = layer.rotation(0.5)
        assert not torch.allclose(half, layer.batched)
        raise RuntimeError("inside")
    assert layer.batched is None
    torch.testing.assert_close(layer.rotation(0.5), half)


def test_batched_rotations_stand_aside_under_gradient_checkpointing():
    """Checkpointed segments recompute their forward outside the block: each layer must compute its own
    rotation then, as in the forward (tests/test_scale.py trains the UNet so)."""
    from src.oft import batched_rotations

    model = _mixed_model(OFTConfig(n_blocks=2, target_modules=[".*"]))
    model.is_gradient_checkpointing = True
    with batched_rotations(model):
        assert all(layer.batched is None for _, layer in oft_layers(model))

"""Several conditions at once (src/models/multi.py): composed rotations, per-condition strengths, composition
of runs and its refusals, one encoder per condition in joint training."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import compose_config, make_trained_run
from torch import nn

from src.errors import ConfigError
from src.models.control import ControlEncoder, control_injection
from src.models.multi import MultiEncoder, composed_rotation, condition_keep, merge_composed
from src.oft import OFTConfig, OFTLinear, hyperspherical_energy

pytestmark = pytest.mark.usefixtures("one_thread")


def random_oft(base: nn.Linear, seed: int, scale: float = 0.3) -> OFTLinear:
    layer = OFTLinear(base, OFTConfig(block_size=4))
    with torch.no_grad():
        layer.oft_skew.copy_(
            torch.randn(layer.oft_skew.shape, generator=torch.Generator().manual_seed(seed)) * scale
        )
    return layer


def test_composed_rotations_are_orthogonal_and_equal_the_layers_one_after_the_other() -> None:
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    first, second = random_oft(copy.deepcopy(base), 1), random_oft(copy.deepcopy(base), 2)
    blocks = composed_rotation([first, second]).double()
    eye = torch.eye(4, dtype=torch.float64).expand_as(blocks)
    assert torch.allclose(blocks.transpose(1, 2) @ blocks, eye, atol=1e-5)  # float32 rotations
    assert not torch.allclose(blocks, first.rotation().double(), atol=1e-3)  # the second one moved it

    # independently: run 1's layer merged, then run 2's rotation applied on top of that merged layer
    after_first = first.merged_module()
    one_after_the_other = OFTLinear(after_first, OFTConfig(block_size=4))
    with torch.no_grad():
        one_after_the_other.oft_skew.copy_(second.oft_skew)
    model = nn.Sequential()
    model.add_module("layer", first)
    merge_composed(model, [{"layer": first}, {"layer": second}])
    x = torch.randn(5, 16)
    assert type(model.layer) is nn.Linear
    assert torch.allclose(model.layer(x), one_after_the_other(x), atol=1e-5)
    # a product of orthogonal matrices keeps the base layer's hyperspherical energy
    assert torch.allclose(
        hyperspherical_energy(model.layer.weight), hyperspherical_energy(base.weight), rtol=1e-6
    )
    # order matters: R1 R2 is not R2 R1
    assert not torch.allclose(
        composed_rotation([second, first]), composed_rotation([first, second]), atol=1e-4
    )


def test_a_rotation_scale_scales_the_generator_and_keeps_the_composition_orthogonal() -> None:
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    first, second = random_oft(copy.deepcopy(base), 1), random_oft(copy.deepcopy(base), 2)
    half = random_oft(copy.deepcopy(base), 1, scale=0.15)  # the same generator set at half its size
    assert torch.allclose(first.rotation(0.5), half.rotation(), atol=1e-6)
    assert torch.equal(first.rotation(1.0), first.rotation())
    eye = torch.eye(4).expand(first.n_blocks, 4, 4)
    assert torch.allclose(first.rotation(0.0), eye)  # scale 0: no rotation
    for scales in ([0.0, 1.0], [0.5, 1.0], [2.0, -1.0]):
        blocks = composed_rotation([first, second], scales).double()
        assert torch.allclose(blocks.transpose(1, 2) @ blocks, eye.double(), atol=1e-5)
    assert torch.allclose(composed_rotation([first, second], [0.0, 1.0]), second.rotation(), atol=1e-6)
    model = nn.Sequential()
    model.add_module("layer", first)
    merge_composed(model, [{"layer": first}, {"layer": second}], [0.5, 1.0])
    assert torch.allclose(
        hyperspherical_energy(model.layer.weight), hyperspherical_energy(base.weight), rtol=1e-6
    )


def perturbed_encoder(seed: int) -> ControlEncoder:
    encoder = ControlEncoder(8, downscale=2, channels=(4, 6))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return encoder


def test_a_condition_off_is_exactly_the_model_without_its_encoder() -> None:
    canny, seg = perturbed_encoder(0), perturbed_encoder(1)
    both = MultiEncoder({"canny": canny, "seg": seg})
    condition = torch.rand(2, 6, 8, 8)
    assert torch.equal(both.embed(condition, {"canny": 1.0, "seg": 0.0}), canny(condition[:, :3]))
    assert torch.equal(both.embed(condition, {"seg": 0.5}), 0.5 * seg(condition[:, 3:]))
    assert torch.allclose(both.embed(condition), canny(condition[:, :3]) + seg(condition[:, 3:]))
    assert both.embed(condition, 0.0) is None
    # per sample: sample 0 keeps only canny, sample 1 only seg
    mixed = both.embed(condition, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(mixed[0], canny(condition[:, :3])[0], atol=1e-6)  # batched convolutions
    assert torch.allclose(mixed[1], seg(condition[:, 3:])[1], atol=1e-6)

    # on a UNet-like conv_in: the injected output equals the single encoder's injection bit for bit
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv_in = nn.Conv2d(3, 8, 3, stride=2, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv_in(x)

    net, x = Net(), torch.randn(2, 3, 8, 8)
    with control_injection(net, both, condition, {"canny": 1.0, "seg": 0.0}):
        composed = net(x)
    with control_injection(net, canny, condition[:, :3]):
        alone = net(x)
    assert torch.equal(composed, alone)
    with pytest.raises(ConfigError, match=r"strength for condition\(s\) \['depth'\].*\['canny', 'seg'\]"):
        both.embed(condition, {"depth": 1.0})
    with pytest.raises(ValueError, match="has 3 channels.*6 channels"):
        both.embed(condition[:, :3])


def test_training_drops_each_condition_independently_and_missing_ones_always() -> None:
    torch.manual_seed(0)
    present = torch.tensor([[True, False]] * 4000)
    keep = condition_keep(present, 4000, 2, 0.3, torch.device("cpu"))
    assert keep[:, 1].sum() == 0  # a missing condition is dropped
    assert abs(keep[:, 0].mean().item() - 0.7) < 0.03
    both = condition_keep(None, 4000, 2, 0.3, torch.device("cpu"))
    assert abs((both[:, 0] * both[:, 1]).mean().item() - 0.49) < 0.03  # independent


@pytest.fixture(scope="module")
def canny_and_seg_runs(offline_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("compose")
    return make_trained_run(root / "canny"), make_trained_run(root / "seg", "task=segmentation")


def test_composed_runs_multiply_rotations_and_add_embeddings(canny_and_seg_runs) -> None:
    from src.models.multi import compose_runs
    from src.models.run import load_run
    from src.oft import oft_layers

    canny_dir, seg_dir = canny_and_seg_runs
    canny_run, seg_run = load_run(canny_dir), load_run(seg_dir)
    layers = {
        name: (a, dict(oft_layers(seg_run.module.unet))[name])
        for name, a in oft_layers(canny_run.module.unet)
    }
    name, (a, b) = next(iter(layers.items()))
    expected = a.base.weight.reshape(a.base.weight.shape[0], -1) @ torch.block_diag(
        *composed_rotation([a, b])
    )
    composed = compose_runs([canny_run, seg_run])
    merged = composed.module.unet.get_submodule(name)
    assert torch.allclose(merged.weight.reshape(expected.shape), expected, atol=1e-6)
    assert not any(True for _ in oft_layers(composed.module.unet))  # every rotation merged
    assert composed.encoder.names == ["canny", "seg"]
    assert composed.encoder.encoders["seg"] is seg_run.module.method.encoder

    # canny's rotations at scale 0: the layer is the base rotated by the segmentation run's alone
    canny_run, seg_run = load_run(canny_dir), load_run(seg_dir)
    b = dict(oft_layers(seg_run.module.unet))[name]
    seg_only = b.base.weight.reshape(expected.shape) @ torch.block_diag(*b.rotation())
    scaled = compose_runs([canny_run, seg_run], {"canny": 0.0}).module.unet.get_submodule(name)
    assert torch.allclose(scaled.weight.reshape(expected.shape), seg_only, atol=1e-6)
    assert not torch.allclose(seg_only, expected, atol=1e-6)
    with pytest.raises(
        ConfigError, match=r"rotation_scale.depth: the composed runs' conditions are \['canny', 'seg'\]"
    ):
        compose_runs([load_run(canny_dir), load_run(seg_dir)], {"depth": 0.5})
    with pytest.raises(ConfigError, match=r"rotation_scale.canny='half': give a number \(1: as trained"):
        compose_runs([load_run(canny_dir), load_run(seg_dir)], {"canny": "half"})


def test_composition_refuses_another_backbone_method_or_a_repeated_condition(
    canny_and_seg_runs, tmp_path
) -> None:
    from src.models.multi import compose_runs
    from src.models.run import load_run

    canny_dir, _ = canny_and_seg_runs
    other_backbone = make_trained_run(tmp_path / "tiny", "model=tiny")
    with pytest.raises(
        ConfigError, match=r"trained on backbone '.*', run '.*canny' on '.*': only runs on one backbone"
    ):
        compose_runs([load_run(canny_dir), load_run(other_backbone)])
    with pytest.raises(ConfigError, match=r"condition\(s\) \['canny'\] come from more than one run"):
        compose_runs([load_run(canny_dir), load_run(canny_dir)])
    lora = make_trained_run(tmp_path / "lora", "method=lora", "task=segmentation")
    with pytest.raises(ConfigError, match="is method=lora: only oft_control, encoder_only runs compose"):
        compose_runs([load_run(canny_dir), load_run(lora)])


def test_joint_task_builds_one_encoder_per_condition_and_refuses_one_condition_methods() -> None:
    from hydra.utils import instantiate

    cfg = compose_config("debug=default", "task=canny_segmentation")
    module = instantiate(cfg.module, condition=cfg.task.condition)
    assert isinstance(module.method.encoder, MultiEncoder)
    assert module.method.encoder.names == ["canny", "seg"]
    assert {n.split(".")[2] for n in module.trainable_names() if n.startswith("encoder.")} == {"canny", "seg"}
    method = instantiate(compose_config("method=controlnet").method)
    with pytest.raises(
        ConfigError, match="method=controlnet reads one condition but task.condition is 'canny\\+seg'"
    ):
        method.check_condition("canny+seg")


def condition_files(folder: Path, n: int = 2) -> Path:
    import numpy as np
    from helpers import demo_inputs
    from PIL import Image

    folder.mkdir()
    for item in demo_inputs(n):
        Image.fromarray((item.condition.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
            folder / f"{item.key}.png"
        )
    return folder


def test_generate_composes_runs_with_a_strength_per_condition(canny_and_seg_runs, tmp_path) -> None:
    from helpers import STEPS
    from PIL import Image

    from src.generate import generate

    canny_dir, seg_dir = canny_and_seg_runs
    edges = condition_files(tmp_path / "edges")

    def run(name: str, *overrides: str) -> dict:
        cfg = compose_config(
            f"run=[{canny_dir},{seg_dir}]",
            "prompt=a red circle",
            f"sampling.num_inference_steps={STEPS}",
            *overrides,
            name="generate",
            output_dir=tmp_path / name,
        )
        return generate(cfg)

    both = run("both", f"+condition.canny={edges}", f"+condition.seg={edges}", "sampling.strength={seg: 0.5}")
    assert both["options"]["strength"] == {"canny": 1.0, "seg": 0.5}
    off = run("off", f"+condition.canny={edges}", f"+condition.seg={edges}", "sampling.strength={seg: 0.0}")
    alone = run("alone", f"+condition.canny={edges}")
    assert alone["options"]["strength"] == {"canny": 1.0, "seg": 0.0}

    def pixels(name: str, record: dict) -> torch.Tensor:
        import numpy as np

        return torch.tensor(
            np.stack([np.asarray(Image.open(tmp_path / name / r["file"])) for r in record["images"]])
        )

    assert torch.equal(pixels("off", off), pixels("alone", alone))  # strength 0 = the condition not given
    assert (pixels("both", both).float() - pixels("alone", alone).float()).abs().max() > 0
    with Image.open(tmp_path / "both" / "grid.png") as grid:  # canny | seg | sample
        assert grid.size == (3 * 64 + 4 * 2, 2 * 64 + 3 * 2)
    with pytest.raises(ConfigError, match=r"condition.depth: this model reads \['canny', 'seg'\]"):
        run("bad", f"+condition.depth={edges}")
    with pytest.raises(ConfigError, match=r"one image source but this model reads \['canny', 'seg'\]"):
        run("one", f"condition={edges}")
    no_canny_rotation = run(
        "scaled", f"+condition.canny={edges}", f"+condition.seg={edges}", "+rotation_scale.canny=0"
    )
    assert (pixels("scaled", no_canny_rotation).float() - pixels("both", both).float()).abs().max() > 0
    with pytest.raises(
        ConfigError, match=r"rotation_scale=\{'canny': 0.5\} scales the runs of a composition"
    ):
        generate(
            compose_config(
                f"run={canny_dir}",
                f"condition={edges}",
                "prompt=a red circle",
                "+rotation_scale.canny=0.5",
                name="generate",
                output_dir=tmp_path / "single",
            )
        )


def test_export_of_composed_runs_loads_back_and_samples_as_the_composition(
    canny_and_seg_runs, tmp_path
) -> None:
    from helpers import STEPS
    from PIL import Image

    from src.export import main as export_main
    from src.generate import generate
    from src.models.exported import EXPORT_INFO, load_exported

    canny_dir, seg_dir = canny_and_seg_runs
    written = export_main(["--run", str(canny_dir), str(seg_dir), "--out_dir", str(tmp_path / "export")])
    folder = written["diffusers"]
    _, encoder, config = load_exported(folder)
    assert config["condition"] == "canny+seg" and isinstance(encoder, MultiEncoder)
    assert encoder.names == ["canny", "seg"]
    edges = condition_files(tmp_path / "edges")

    def run(name: str, source: str) -> list:
        import numpy as np

        cfg = compose_config(
            f"run={source}",
            f"+condition.canny={edges}",
            f"+condition.seg={edges}",
            "prompt=a red circle",
            f"sampling.num_inference_steps={STEPS}",
            name="generate",
            output_dir=tmp_path / name,
        )
        record = generate(cfg)
        return [np.asarray(Image.open(tmp_path / name / r["file"])).astype(int) for r in record["images"]]

    for exported, composed in zip(
        run("exported", str(folder)), run("runs", f"[{canny_dir},{seg_dir}]"), strict=True
    ):
        assert abs(exported - composed).max() <= 1  # merged weights saved and loaded: within one level
    scaled = export_main(
        ["--run", str(canny_dir), str(seg_dir), "--out_dir", str(tmp_path / "scaled")]
        + ["--rotation_scale", "canny=0.25"]
    )["diffusers"]
    assert json.loads((scaled / EXPORT_INFO).read_text())["rotation_scales"] == [0.25, 1.0]
    with pytest.raises(ConfigError, match="--rotation_scale 'canny': write CONDITION=SCALE"):
        export_main(
            ["--run", str(canny_dir), str(seg_dir), "--out_dir", str(tmp_path / "y")]
            + ["--rotation_scale", "canny"]
        )
    with pytest.raises(ConfigError, match="several --run compose into one diffusers folder"):
        export_main(
            ["--run", str(canny_dir), str(seg_dir), "--out_dir", str(tmp_path / "x"), "--formats", "peft"]
        )


def test_a_joint_run_exports_every_encoder_and_refuses_one_encoder_formats(offline_cache, tmp_path) -> None:
    from src.export import export
    from src.models.exported import load_exported
    from src.models.run import load_run

    joint = make_trained_run(tmp_path / "joint", "task=canny_segmentation")
    written = export(joint, tmp_path / "export", ["diffusers"])
    _, encoder, config = load_exported(written["diffusers"])
    assert config["version"] == 2 and config["condition"] == "canny+seg"
    trained = load_run(joint).module.encoder.state_dict()
    assert trained.keys() == encoder.state_dict().keys()
    assert all(torch.equal(trained[k], v) for k, v in encoder.state_dict().items())
    with pytest.raises(ConfigError, match="--formats hint_embedding: holds one condition's encoder"):
        export(joint, tmp_path / "hint", ["hint_embedding"])


def test_evaluate_scores_each_condition_of_a_composition_at_its_rotation_scales(canny_and_seg_runs, tmp_path):
    from helpers import STEPS

    from data_prep import demo
    from src.evaluate import evaluate

    canny_dir, seg_dir = canny_and_seg_runs
    shards = demo.build_demo("canny+seg", tmp_path / "data", train_scenes=4, val_scenes=4, shard_size=4)

    def run(name: str, *overrides: str) -> dict:
        cfg = compose_config(
            f"run=[{canny_dir},{seg_dir}]",
            f"shards={shards}/val-*.tar",
            "max_samples=4",
            f"sampling.num_inference_steps={STEPS}",
            "segmenter.model=toy",
            *overrides,
            name="evaluate",
            output_dir=tmp_path / name,
        )
        return evaluate(cfg)

    import numpy as np
    from PIL import Image

    for name, overrides in (("as_trained", ()), ("scaled", ("+rotation_scale.canny=0",))):
        report = run(name, *overrides)
        per_sample = json.loads((tmp_path / name / "metrics.json").read_text())["per_sample"]
        assert len(per_sample) == 4
        for metric in ("canny_f1", "seg_miou"):  # each condition's own metric, the mean of its samples
            values = [sample[metric] for sample in per_sample]
            assert report["metrics"][metric] == pytest.approx(sum(values) / len(values))
    # the same samples and seeds: only the canny run's rotations differ, so the generated images do
    grids = [
        np.asarray(Image.open(tmp_path / name / "best.png")).astype(int) for name in ("as_trained", "scaled")
    ]
    assert grids[0].shape == grids[1].shape and np.abs(grids[0] - grids[1]).max() > 0

"""The commands on an SDXL run (`model=sdxl`, a random-weight small SDXL-architecture folder): generate against
stock diffusers' `StableDiffusionXLPipeline` over the exported folder, evaluate against the metric recomputed
from those images, export (diffusers, peft, control_encoder, lora, controlnet_xs, single_file: see
test_export_sdxl.py; hint_embedding drives the stock pipeline) against independent loaders, and the app's sampling against `python -m src.generate`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import STEPS, compose_config, demo_inputs, make_trained_run

from src.export import export
from src.models import xl
from src.models.inference import generate_images, load_controlled
from src.models.sampling import SamplingOptions

pytestmark = pytest.mark.usefixtures("one_thread")
RES = 64


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory of OFT-Control on the small SDXL folder, with perturbed trained tensors."""
    folder = xl.write_small_folder(tmp_path_factory.mktemp("sdxl") / "small")
    out = tmp_path_factory.mktemp("sdxl-run") / "run"
    return make_trained_run(out, "model=sdxl", f"model.path={folder}", f"model.resolution={RES}")


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """`python -m src.export` with every format: the folders written and the lines reported."""
    lines: list[str] = []
    folders = export(run, tmp_path_factory.mktemp("sdxl-export"), report=lines.append)
    return folders, lines


def inputs(n: int = 2):
    items = demo_inputs(n)
    return items, torch.stack([i.condition for i in items]), [i.caption for i in items]


def stock_images(folders, conditions, prompts, options: SamplingOptions) -> torch.Tensor:
    """Stock `StableDiffusionXLPipeline.from_pretrained(diffusers/)` (rotations merged) with the exported
    `hint_embedding/` (diffusers' `ControlNetConditioningEmbedding`) added after `conv_in` by a plain forward
    hook: what a user of the export runs, no project code."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
    from safetensors.torch import load_file

    pipe = StableDiffusionXLPipeline.from_pretrained(folders["diffusers"], add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    hint = ControlNetConditioningEmbedding(
        **json.loads((folders["hint_embedding"] / "config.json").read_text())
    )
    hint.load_state_dict(load_file(folders["hint_embedding"] / "model.safetensors"))
    with torch.no_grad():
        embedding = options.strength * hint(conditions)

    def add(_module, _inputs, output):  # both guidance branches: the batch holds the conditions twice
        return output + embedding.repeat(output.shape[0] // embedding.shape[0], 1, 1, 1)

    handle = pipe.unet.conv_in.register_forward_hook(add)
    generators = [torch.Generator().manual_seed(options.seed) for _ in prompts]
    try:
        images = pipe(
            prompt=prompts,
            height=RES,
            width=RES,
            num_inference_steps=options.steps,
            guidance_scale=options.guidance_scale,
            generator=generators,
            output_type="pt",
        ).images
    finally:
        handle.remove()
    return images.clamp(0, 1)


# ------------------------------------------------------------------------------------------- generate
def test_generate_equals_the_stock_sdxl_pipeline_over_the_export(run, exported, tmp_path):
    from PIL import Image

    from src.generate import generate

    items, conditions, prompts = inputs()  # builds the demo shards
    shards = f"{compose_config().paths.data_dir}/demo/canny/val-*.tar"
    cfg = compose_config(
        f"run={run}",
        f"condition='{shards}'",
        "limit=2",
        f"sampling.num_inference_steps={STEPS}",
        name="generate",
        output_dir=tmp_path,
    )
    record = generate(cfg)
    ours = torch.stack(
        [
            torch.from_numpy(np.array(Image.open(tmp_path / r["file"]).convert("RGB"))).permute(2, 0, 1)
            for r in record["images"]
        ]
    )
    options = SamplingOptions(num_inference_steps=STEPS)
    stock = (stock_images(exported[0], conditions, prompts, options) * 255).round()
    assert [r["key"] for r in record["images"]] == [i.key for i in items]
    assert (ours.float() - stock).abs().max() <= 1  # PNG rounding of float-rounding differences
    untrained = stock_images(
        exported[0], conditions, prompts, SamplingOptions(num_inference_steps=STEPS, strength=0)
    )
    assert (stock / 255 - untrained).abs().max() > 0.02  # the control shows in the images


# ------------------------------------------------------------------------------------------- evaluate
def test_evaluate_scores_the_images_of_the_run(run, tmp_path):
    from src.evaluate import evaluate
    from src.metrics.base import to_uint8
    from src.metrics.edges import canny_iou_f1

    cfg = compose_config(
        f"run={run}",
        "max_samples=2",
        f"sampling.num_inference_steps={STEPS}",
        name="evaluate",
        output_dir=tmp_path,
    )
    report = evaluate(cfg)
    items, conditions, prompts = inputs()
    images = generate_images(
        load_controlled(run), conditions, prompts, SamplingOptions(num_inference_steps=STEPS)
    )
    expected = {
        item.key: canny_iou_f1(image, target)[1]
        for item, image, target in zip(
            items, to_uint8(images[:, 0]), to_uint8(torch.stack([i.target for i in items])), strict=True
        )
    }
    per_sample = {s["key"]: s["canny_f1"] for s in report["per_sample"]}
    assert per_sample == pytest.approx(expected)
    assert report["metrics"]["canny_f1"] == pytest.approx(sum(expected.values()) / 2)


# ------------------------------------------------------------------------------------------- export
def test_export_writes_every_format_sdxl_hosts(exported):
    folders, lines = exported
    assert sorted(folders) == [
        "control_encoder",
        "controlnet_xs",
        "diffusers",
        "hint_embedding",
        "lora",
        "peft",
        "single_file",
    ]
    assert lines == []  # single_file writes SDXL's layout (tests/test_export_sdxl.py)


def test_peft_adapter_on_the_base_sdxl_unet_gives_our_outputs(run, exported):
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    from src.models.run import load_run

    module = load_run(run).module
    base = UNet2DConditionModel.from_pretrained(module.backbone_spec.path, subfolder="unet")
    g = torch.Generator().manual_seed(1)
    latents, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    text, extra = module.text_conditioning(["a red circle", "a blue square"], (RES, RES))
    with torch.no_grad():
        untouched = base(latents, t, text, **extra).sample
        ours = module.unet(latents, t, text, **extra).sample
        theirs = PeftModel.from_pretrained(base, exported[0]["peft"])(latents, t, text, **extra).sample
    assert (ours - untouched).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_lora_differences_take_the_base_to_the_merged_weights(run, exported):
    """Base SDXL weight + `lora_unet_<layer>.diff` = the merged UNet's weight in the diffusers export."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from src.models.run import load_run

    base = UNet2DConditionModel.from_pretrained(load_run(run).module.backbone_spec.path, subfolder="unet")
    merged = UNet2DConditionModel.from_pretrained(exported[0]["diffusers"], subfolder="unet")
    diffs = load_file(exported[0]["lora"] / "lora.safetensors")
    base_weights, merged_weights = dict(base.named_parameters()), dict(merged.named_parameters())
    assert len(diffs) == 108  # 12 transformer blocks x 9 layers in the small SDXL UNet
    for key, diff in diffs.items():
        name = key.removeprefix("lora_unet_").removesuffix(".diff")
        layer = next(n for n in base_weights if n.replace(".", "_") == f"{name}_weight")
        torch.testing.assert_close(base_weights[layer] + diff, merged_weights[layer], atol=1e-6, rtol=0)


def test_stock_controlnet_xs_sdxl_pipeline_reproduces_the_run(run, exported):
    """`StableDiffusionXLControlNetXSPipeline` with the exported adapter over the exported folder gives the
    run's images once the XS base ResNets get the UNet's GroupNorm eps back (see src/formats/controlnet_xs.py)."""
    from diffusers import ControlNetXSAdapter, DDIMScheduler, StableDiffusionXLControlNetXSPipeline

    from src.formats.controlnet_xs import match_resnet_eps

    folders = exported[0]
    adapter = ControlNetXSAdapter.from_pretrained(folders["controlnet_xs"])
    pipe = StableDiffusionXLControlNetXSPipeline.from_pretrained(
        folders["diffusers"], controlnet=adapter, add_watermarker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    match_resnet_eps(pipe.unet, pipe.unet.config.get("norm_eps", 1e-5))
    _, conditions, prompts = inputs()
    options = SamplingOptions(num_inference_steps=STEPS, strength=0.8)
    ours = generate_images(load_controlled(run), conditions, prompts, options)[:, 0]
    xs = pipe(
        prompt=prompts,
        image=conditions,
        height=RES,
        width=RES,
        num_inference_steps=STEPS,
        guidance_scale=options.guidance_scale,
        controlnet_conditioning_scale=0.8,
        generator=[torch.Generator().manual_seed(0) for _ in prompts],
        output_type="pt",
    ).images.clamp(0, 1)
    assert (xs - ours).abs().max() <= 1e-4


# ------------------------------------------------------------------------------------------- app
def test_app_samples_what_generate_writes(run, tmp_path):
    """The app's loading (`load_or_exit`) and sampling (`generate_samples`, what its API calls) give
    `python -m src.generate`'s image for the same condition, prompt and seed."""
    from PIL import Image

    from src.app import load_or_exit
    from src.app_ui.blocks import build_app, generate_samples
    from src.app_ui.conditions import to_uint8
    from src.generate import generate

    cfg = compose_config(f"run={run}", f"sampling.num_inference_steps={STEPS}", name="app")
    model = load_or_exit(cfg)
    assert (model.condition, model.resolution) == ("canny", RES)
    item = demo_inputs(1)[0]
    png = tmp_path / "edges.png"
    Image.fromarray(to_uint8(item.condition)).save(png)
    defaults = SamplingOptions(num_inference_steps=STEPS)
    build_app(model, defaults)  # the page builds over an SDXL model
    served = generate_samples(model, defaults, np.asarray(Image.open(png)), "a red circle", seed=3)
    gen = compose_config(
        f"run={run}",
        f"condition={png}",
        "prompt=a red circle",
        "sampling.seed=3",
        f"sampling.num_inference_steps={STEPS}",
        name="generate",
        output_dir=tmp_path,
    )
    record = generate(gen)
    written = np.asarray(Image.open(tmp_path / record["images"][0]["file"]).convert("RGB"))
    assert np.array_equal(served.images[0], written)


@pytest.mark.slow
def test_served_app_gives_the_image_of_python_m_src_generate(run, tmp_path):
    """`python -m src.app run=<SDXL run>` in a subprocess: its `generate` API returns src.generate's image."""
    from gradio_client import Client, handle_file
    from PIL import Image
    from test_app import edge_png, serve

    from src.generate import generate

    png = edge_png(tmp_path)
    with serve(run, f"sampling.num_inference_steps={STEPS}", log=tmp_path / "app.log") as server:
        gallery, _, _ = Client(server.url, verbose=False).predict(
            handle_file(str(png)), "a red circle", api_name="/generate", seed=2
        )
    gen = compose_config(
        f"run={run}",
        f"condition={png}",
        "prompt=a red circle",
        "sampling.seed=2",
        f"sampling.num_inference_steps={STEPS}",
        name="generate",
        output_dir=tmp_path / "generate",
    )
    record = generate(gen)
    served = np.asarray(Image.open(gallery[0]["image"]).convert("RGB"))
    written = np.asarray(Image.open(tmp_path / "generate" / record["images"][0]["file"]).convert("RGB"))
    assert served.shape == (RES, RES, 3) and np.array_equal(served, written)

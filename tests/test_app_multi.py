"""The browser demo of a model of several conditions: `python -m src.app run=[CANNY_RUN,SEG_RUN]` composes the
runs (as `python -m src.generate` does) and serves one upload and one strength slider per condition.

Through `gradio_client` against the served app: strength 0 is the condition not given, both conditions
change the image, no image gets the page's one-line message, and the image is `python -m src.generate`'s.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import RES, STEPS, compose_config, make_trained_run
from PIL import Image
from test_app import edge_png, serve

from src.app_ui.blocks import condition_strengths, generate_samples
from src.app_ui.conditions import to_uint8
from src.data.inputs import read_condition_image
from src.data.palette import colorize
from src.models.sampling import SamplingOptions

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red circle"
NAMES = ["canny", "seg"]


def seg_png(folder: Path) -> Path:
    """A segmentation condition in the ADE20K palette (wall, sky and building regions), as a PNG."""
    labels = np.zeros((RES, RES), np.uint8)
    labels[:20], labels[20:44, 8:40], labels[44:, 30:] = 3, 1, 2
    path = folder / "seg.png"
    Image.fromarray(colorize(labels)).save(path)
    return path


def pixels(gallery: list[dict]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(item["image"]).convert("RGB")) for item in gallery]).astype(int)


# ----------------------------------------------------------------------------------------------- no server
def test_strengths_are_generates_zero_for_conditions_not_given():
    assert condition_strengths(NAMES, ["canny"], None, 1.0) == {"canny": 1.0, "seg": 0.0}
    assert condition_strengths(NAMES, NAMES, {"seg": 0.5}, 1.0) == {"canny": 1.0, "seg": 0.5}
    assert condition_strengths(NAMES, NAMES, None, {"seg": 0.25}) == {"canny": 1.0, "seg": 0.25}
    assert condition_strengths(NAMES, ["seg"], 0.7, 1.0) == {"canny": 0.0, "seg": 0.7}
    with pytest.raises(ValueError, match=r"strength for condition\(s\) \['depth'\].*\['canny', 'seg'\]"):
        condition_strengths(NAMES, NAMES, {"depth": 1.0}, 1.0)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (None, r"^No condition image: upload at least one of canny, seg \(this model reads canny\+seg\)\.$"),
        ({"canny": None, "seg": None}, "No condition image: upload at least one of canny, seg"),
        (np.zeros((RES, RES, 3), np.uint8), "give one image per condition, by name"),
        ({"depth": np.zeros((RES, RES, 3), np.uint8)}, r"image for condition\(s\) \['depth'\]"),
        ({"seg": np.zeros((4, RES, 3), np.uint8)}, "The seg image cannot be used as a condition: image of"),
    ],
)
def test_bad_multi_inputs_get_a_message_for_the_page_before_sampling(images, message):
    model = SimpleNamespace(condition="canny+seg", resolution=RES)  # never sampled: the checks come first
    with pytest.raises(ValueError, match=message):
        generate_samples(model, SamplingOptions(), images, PROMPT)


# ----------------------------------------------------------------------------------------------- served app
@pytest.fixture(scope="module")
def canny_and_seg_runs(offline_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("compose")
    return make_trained_run(root / "canny"), make_trained_run(root / "seg", "task=segmentation")


def test_the_app_composes_with_the_rotation_scales_of_its_config(canny_and_seg_runs):
    from src.app import load_or_exit
    from src.errors import InputError
    from src.models.inference import load_controlled

    canny_dir, seg_dir = canny_and_seg_runs
    runs = f"run=[{canny_dir},{seg_dir}]"
    scaled = load_or_exit(compose_config(runs, "+rotation_scale.canny=0", name="app")).pipe.unet.state_dict()
    expected = load_controlled([str(canny_dir), str(seg_dir)], rotation_scale={"canny": 0.0})
    as_trained = load_controlled([str(canny_dir), str(seg_dir)]).pipe.unet.state_dict()
    assert all(torch.equal(scaled[k], v) for k, v in expected.pipe.unet.state_dict().items())
    assert any(not torch.equal(scaled[k], v) for k, v in as_trained.items())
    with pytest.raises(InputError, match=r"cannot load run .*: rotation_scale.depth: the composed runs'"):
        load_or_exit(compose_config(runs, "+rotation_scale.depth=1", name="app"))


@pytest.fixture(scope="module")
def served(canny_and_seg_runs, tmp_path_factory):
    """The app over the two runs composed, in a subprocess on a free port, with 2 sampling steps by default."""
    canny_dir, seg_dir = canny_and_seg_runs
    log = tmp_path_factory.mktemp("app-multi") / "app.log"
    with serve(
        f"[{canny_dir},{seg_dir}]", f"sampling.num_inference_steps={STEPS}", "examples=2", log=log
    ) as server:
        print(f"app answered after {server.startup_s:.1f} s")
        yield server


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served.url, verbose=False)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> SimpleNamespace:
    folder = tmp_path_factory.mktemp("multi-inputs")
    return SimpleNamespace(canny=edge_png(folder), seg=seg_png(folder))


def test_the_page_has_an_upload_and_a_strength_per_condition_and_each_runs_examples(served, client):
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/generate"]
    assert [p["parameter_name"] for p in api["parameters"]] == [
        "canny_image",
        "seg_image",
        "prompt",
        "negative_prompt",
        "num_samples",
        "seed",
        "steps",
        "guidance_scale",
        "canny_strength",
        "seg_strength",
        "scheduler",
        "mode",
    ]
    with urllib.request.urlopen(served.url + "config", timeout=30) as response:
        components = json.load(response)["components"]
    labels = {c["props"].get("label") for c in components}
    assert {"canny condition", "seg condition", "canny strength", "seg strength"} <= labels
    assert "Draw a condition" not in labels  # uploads only
    examples = [c for c in components if c["type"] == "dataset"]
    assert len(examples) == 2  # one table per run, filling that run's condition only
    assert ["canny" in e["props"]["label"] for e in examples] == [True, False]


def test_strength_zero_is_the_condition_not_given_and_both_change_the_image(client, inputs):
    from gradio_client import handle_file

    def generate(**given):
        files = {f"{name}_image": handle_file(str(path)) for name, path in given.pop("images").items()}
        return client.predict(**files, prompt=PROMPT, api_name="/generate", **given)

    alone, used, note = generate(images={"canny": inputs.canny})
    assert "canny (strength 1)" in note and "seg" not in note
    with Image.open(used) as image:  # only the given condition
        assert np.array_equal(
            np.asarray(image.convert("RGB")), to_uint8(read_condition_image(inputs.canny, RES, "canny"))
        )
    off, used, note = generate(images=vars(inputs), canny_strength=1, seg_strength=0)
    assert np.array_equal(pixels(off), pixels(alone))  # strength 0 = the condition not given
    with Image.open(used) as image:  # the given conditions side by side, in the model's order
        assert image.size == (2 * RES, RES)
    both, _, note = generate(images=vars(inputs), canny_strength=1, seg_strength=1)
    assert np.abs(pixels(both) - pixels(alone)).max() > 0
    assert "canny (strength 1)" in note and "seg (strength 1)" in note


def test_no_image_gets_the_one_line_message(client, served):
    with pytest.raises(Exception, match=r"No condition image: upload at least one of canny, seg") as error:
        client.predict(prompt=PROMPT, api_name="/generate")
    assert "\n" not in str(error.value).strip()
    assert "Traceback" not in served.log.read_text(), served.log.read_text()[-3000:]


def test_the_image_is_python_m_src_generates(client, inputs, canny_and_seg_runs, tmp_path):
    from gradio_client import handle_file

    from src.generate import generate

    canny_dir, seg_dir = canny_and_seg_runs
    gallery, used, _ = client.predict(
        canny_image=handle_file(str(inputs.canny)),
        seg_image=handle_file(str(inputs.seg)),
        prompt=PROMPT,
        num_samples=2,
        seed=3,
        guidance_scale=7.5,
        canny_strength=1.0,
        seg_strength=0.5,
        api_name="/generate",
    )
    record = generate(
        compose_config(
            f"run=[{canny_dir},{seg_dir}]",
            f"+condition.canny={inputs.canny}",
            f"+condition.seg={inputs.seg}",
            f"prompt={PROMPT}",
            "sampling.num_samples=2",
            "sampling.seed=3",
            f"sampling.num_inference_steps={STEPS}",
            "sampling.guidance_scale=7.5",
            "sampling.strength={canny: 1.0, seg: 0.5}",
            name="generate",
            output_dir=tmp_path / "generate",
        )
    )
    assert record["options"]["strength"] == {"canny": 1.0, "seg": 0.5}
    assert [item["caption"] for item in gallery] == ["seed 3", "seed 4"]
    generated = np.stack(
        [np.asarray(Image.open(tmp_path / "generate" / r["file"]).convert("RGB")) for r in record["images"]]
    ).astype(int)
    assert np.abs(pixels(gallery) - generated).max() <= 1
    expected = torch.cat(
        [read_condition_image(inputs.canny, RES, "canny"), read_condition_image(inputs.seg, RES, "seg")],
        dim=2,
    )
    with Image.open(used) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), to_uint8(expected))

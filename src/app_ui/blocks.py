"""The Gradio app over a trained model: a condition (uploaded or drawn) and a prompt in, samples out.

Sampling is the library's: `generate_samples` calls `src.models.inference.generate_images` exactly as
`python -m src.generate` does, so a seed gives the same image in both. The event behind the Generate
button is the named API endpoint `generate`; its first two inputs are the condition image and the prompt
and the others default to the app's settings:

    Client(url).predict(handle_file("edges.png"), "a red circle", api_name="/generate")
    # -> (gallery [{"image": path, "caption": "seed 0"}, ...], condition used (path), note)

A model of several conditions (`model.condition` such as `canny+seg`: a jointly trained run, runs composed
with `run=[A,B]`, or their export) gets one upload per condition and a strength slider per condition
(0..2). Its `generate` endpoint takes, in this order: one image per condition (`<name>_image`, in the
order of `model.condition.split('+')`), `prompt`, `negative_prompt`, `num_samples`, `seed`, `steps`,
`guidance_scale`, one strength per condition (`<name>_strength`, same order), `scheduler`, `mode`:

    Client(url).predict(canny_image=handle_file("edges.png"), seg_image=handle_file("seg.png"),
                        prompt="a red circle", seg_strength=0.5, api_name="/generate")

Conditions left out (None) are not encoded (strength 0, as `python -m src.generate` without
`+condition.<name>`); at least one is needed. Its "condition used" shows the conditions given side by side,
in that order. The multi page offers uploads only (no Draw tab).

Analytics are off and nothing is fetched from the internet: no share link, no server-side rendering, and
the default theme's fonts ship inside the gradio wheel.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from src.app_ui.conditions import ANNOTATION, MODES, palette_classes, prepare_condition, to_uint8
from src.app_ui.examples import Example, MultiExample
from src.app_ui.uploads import guard_uploads
from src.models.inference import ControlledModel, generate_images
from src.models.multi import split_condition
from src.models.sampling import SCHEDULERS, SamplingOptions

API_NAME = "generate"
CANVAS = 512  # drawing canvas side in pixels; the drawing is resized to the run's resolution
DRAWING_COLOURS = (
    "#ffffff",
    "#ff0000",
    "#00ff00",
    "#0000ff",
    "#ffff00",
)  # tasks without a palette: landmarks
#: small images shown large keep their pixels instead of being blurred by the browser
CSS = "#samples img, #condition-used img { image-rendering: pixelated; }"


@dataclass
class Generation:
    """Samples (RGB uint8), the seed of each, the condition the model got (RGB uint8) and how it was made."""

    images: list[np.ndarray]
    seeds: list[int]
    condition: np.ndarray
    note: str


#: one image per condition name (None: not given), for a model of several conditions
ConditionImages = Mapping[str, np.ndarray | None]


def generate_samples(
    model: ControlledModel,
    defaults: SamplingOptions,
    image: np.ndarray | ConditionImages | None,
    prompt: str | None,
    negative_prompt: str | None = None,
    num_samples: int = 1,
    seed: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    strength: float | Mapping[str, float | None] | None = None,
    scheduler: str | None = None,
    mode: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> Generation:
    """Samples of `model` for one condition image and prompt; settings left None keep `defaults`.

    A model of several conditions takes `image` as a mapping by condition name (None or left out: not
    given) and `strength` as a number for every condition given or a mapping by name (see
    `prepare_conditions`).

    Raises ValueError, with a message meant for the page, for a missing or unusable image, an empty
    prompt or an invalid setting.
    """
    names = split_condition(model.condition)
    if len(names) > 1:
        if image is not None and not isinstance(image, Mapping):
            raise ValueError(f"This model reads {model.condition}: give one image per condition, by name.")
        provided = {k: v for k, v in dict(image or {}).items() if v is not None}
        if not provided:
            raise ValueError(
                f"No condition image: upload at least one of {', '.join(names)} (this model reads "
                f"{model.condition})."
            )
    elif image is None:
        raise ValueError(
            "No condition image: upload one, draw one (Draw tab, then 'Use drawing') or pick an example."
        )
    if not prompt or not prompt.strip():
        raise ValueError("The prompt is empty: describe the picture, e.g. 'a red circle and a blue square'.")
    if len(names) > 1:
        tensor, shown, note, strength = prepare_conditions(
            names, provided, strength, defaults.strength, model.resolution, mode
        )
    else:
        try:
            prepared = prepare_condition(image, model.condition, model.resolution, mode)
        except ValueError as error:
            raise ValueError(f"This image cannot be used as a condition: {error}") from None
        tensor, shown, note = prepared.tensor, to_uint8(prepared.tensor), prepared.note
        strength = None if strength is None else float(strength)
    given = {
        "scheduler": (scheduler, str),
        "num_inference_steps": (steps, int),
        "seed": (seed, int),
        "guidance_scale": (guidance_scale, float),
        "strength": (strength, lambda v: v),  # a float, or one per condition (prepare_conditions)
        "num_samples": (num_samples, int),
    }  # gradio gives numbers as floats
    settings = {k: cast(v) for k, (v, cast) in given.items() if v is not None}
    options = replace(defaults, negative_prompt=negative_prompt or None, **settings)
    images = generate_images(model, tensor[None], [prompt], options, progress)[0]
    return Generation(
        [to_uint8(x) for x in images],
        [options.seed + s for s in range(len(images))],
        shown,
        note,
    )


def condition_strengths(
    names: Sequence[str],
    given: Sequence[str],
    strength: float | Mapping[str, float | None] | None,
    default: float | Mapping[str, float],
) -> dict[str, float]:
    """The strength of every condition, as `python -m src.generate` sets them: 0 (not encoded) for those not
    given; for the others `strength` (a number, or a mapping by name), else `default` (`sampling.strength`:
    a number, or a mapping by name whose missing names are 1)."""
    for what, keys in (("strength", strength if isinstance(strength, Mapping) else {}), ("image", given)):
        unknown = sorted(set(keys) - set(names))
        if unknown:
            raise ValueError(
                f"{what} for condition(s) {unknown}, but this model's conditions are {list(names)}"
            )

    def fallback(name: str) -> float:
        return float(default.get(name, 1.0)) if isinstance(default, Mapping) else float(default)

    strengths = {}
    for name in names:
        value = strength.get(name) if isinstance(strength, Mapping) else strength
        strengths[name] = (fallback(name) if value is None else float(value)) if name in given else 0.0
    return strengths


def prepare_conditions(
    names: Sequence[str],
    images: ConditionImages,
    strength: float | Mapping[str, float | None] | None,
    default: float | Mapping[str, float],
    resolution: int,
    mode: str = "auto",
) -> tuple[torch.Tensor, np.ndarray, str, dict[str, float]]:
    """The conditions of a model of several: `[3k, R, R]`, side by side in the order of `names` (zeros for a
    condition not given), each given image prepared for its own condition (`prepare_condition`); the
    given ones side by side as shown on the page (RGB uint8), the note of each, and the strength of each
    condition (`condition_strengths`: 0 for those not given)."""
    given = {name: image for name, image in images.items() if image is not None}
    strengths = condition_strengths(names, list(given), strength, default)
    prepared = {}
    for name in names:
        if name in given:
            try:
                prepared[name] = prepare_condition(given[name], name, resolution, mode)
            except ValueError as error:
                raise ValueError(f"The {name} image cannot be used as a condition: {error}") from None
    blank = torch.zeros(3, resolution, resolution)
    tensor = torch.cat([prepared[name].tensor if name in prepared else blank for name in names])
    shown = np.concatenate([to_uint8(p.tensor) for p in prepared.values()], axis=1)
    note = "; ".join(f"{name} (strength {strengths[name]:g}): {p.note}" for name, p in prepared.items())
    return tensor, shown, note, strengths


def import_gradio():
    """`gradio`, imported with its analytics (usage reports, version check) switched off."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio

    return gradio


def palette_legend(classes: Sequence[tuple[int, str, str]]) -> str:
    """HTML swatches of the segmentation classes offered for drawing."""
    swatches = "".join(
        f'<span style="display:inline-block;margin:2px 8px 2px 0"><span style="display:inline-block;width:14px;'
        f'height:14px;background:{colour};vertical-align:middle;border:1px solid #888"></span> {k} {name}</span>'
        for k, name, colour in classes
    )
    return f"<div><b>ADE20K palette</b> (class colours of this run's data): {swatches}</div>"


def condition_upload(gr, label: str, elem_id: str):
    """An upload `gradio.Image` for a condition, each upload checked before Gradio decodes it."""
    image = gr.Image(
        label=label,
        type="numpy",
        image_mode="RGB",
        sources=["upload", "clipboard"],
        format="png",
        elem_id=elem_id,
    )
    return guard_uploads(image, gr)


def text_and_sampling(
    gr, defaults: SamplingOptions, max_samples: int, strengths: Sequence[tuple[str, float]]
):
    """Prompt, negative prompt and the Sampling accordion, with one control strength slider per
    `(label, default)` beside the guidance slider; returns the components (the sliders as a list)."""
    prompt = gr.Textbox(label="Prompt", placeholder="a red circle and a blue square", elem_id="prompt")
    negative = gr.Textbox(label="Negative prompt", value=defaults.negative_prompt or "")
    with gr.Accordion("Sampling", open=True):
        with gr.Row():
            num_samples = gr.Slider(1, max_samples, value=defaults.num_samples, step=1, label="Samples")
            seed = gr.Number(value=defaults.seed, precision=0, label="Seed (sample s: seed + s)")
        with gr.Row():
            steps = gr.Slider(1, 100, value=defaults.steps, step=1, label="Steps")
            scheduler = gr.Dropdown(list(SCHEDULERS), value=defaults.scheduler, label="Scheduler")
        with gr.Row():
            guidance = gr.Slider(0, 20, value=defaults.guidance_scale, step=0.5, label="Guidance")
            sliders = [gr.Slider(0, 2, value=value, step=0.05, label=label) for label, value in strengths]
    return prompt, negative, num_samples, seed, steps, scheduler, guidance, sliders


def output_panel(gr):
    """The samples gallery, the condition used and the note on how it was made."""
    gallery = gr.Gallery(
        label="Samples",
        columns=2,
        rows=2,
        height=600,
        format="png",
        object_fit="contain",
        elem_id="samples",
    )
    with gr.Row():
        used = gr.Image(
            label="Condition used", height=200, format="png", interactive=False, elem_id="condition-used"
        )
        note = gr.Markdown(elem_id="note")
    return gallery, used, note


def page_error(gr, error: ValueError):
    return gr.Error(str(error), print_exception=False)


def page_result(gr, generate: Callable[[], Generation]) -> tuple[list, np.ndarray, str]:
    """`(gallery, condition used, note)` of a generation, or its ValueError as the page's one-line message."""
    try:
        result = generate()
    except ValueError as error:
        raise page_error(gr, error) from None
    gallery = [(image, f"seed {s}") for image, s in zip(result.images, result.seeds, strict=True)]
    return gallery, result.condition, result.note


def build_app(
    model: ControlledModel,
    defaults: SamplingOptions,
    examples: Sequence[Example] | Sequence[MultiExample] = (),
    title: str = "",
    max_samples: int = 8,
):
    """The `gradio.Blocks` app: condition and settings on the left, samples and the condition used on the right.

    A model of several conditions gets `build_multi_app`'s page (`examples` then are `MultiExample`s)."""
    if len(split_condition(model.condition)) > 1:
        return build_multi_app(model, defaults, examples, title, max_samples)
    gr = import_gradio()
    task = model.condition
    classes = palette_classes([e.labels for e in examples if e.labels is not None]) if task == "seg" else []
    brush = [c for _, _, c in classes] or (["#ffffff"] if task == "canny" else list(DRAWING_COLOURS))
    blank = {"background": np.zeros((CANVAS, CANVAS, 3), np.uint8), "layers": [], "composite": None}

    def on_generate(
        image,
        prompt,
        negative_prompt,
        num_samples,
        seed,
        steps,
        guidance_scale,
        strength,
        scheduler,
        mode,
        progress=gr.Progress(),  # noqa: B008 (gradio finds its progress tracker by this default)
    ):
        def report(done: int, total: int) -> None:
            progress((done, total), desc="denoising")

        settings = (negative_prompt, num_samples, seed, steps, guidance_scale, strength, scheduler, mode)
        return page_result(gr, lambda: generate_samples(model, defaults, image, prompt, *settings, report))

    def use_drawing(drawing: dict[str, Any] | None):
        if drawing is None or drawing.get("composite") is None:
            raise gr.Error("Nothing drawn yet.", print_exception=False)
        return drawing["composite"]

    with gr.Blocks(title=f"OFT-Control: {task}", analytics_enabled=False) as demo:
        gr.Markdown(f"## OFT-Control: {task} control at {model.resolution} px\n`{title}`")
        with gr.Row():
            with gr.Column():
                with gr.Tabs():
                    with gr.Tab("Upload"):
                        condition = condition_upload(gr, "Condition image", "condition")
                    with gr.Tab("Draw"):
                        sketch = gr.Sketchpad(
                            value=blank,
                            type="numpy",
                            image_mode="RGB",
                            label="Draw a condition",
                            brush=gr.Brush(colors=brush, color_mode="fixed"),
                            canvas_size=(CANVAS, CANVAS),
                            elem_id="sketch",
                        )
                        use = gr.Button("Use drawing")
                if classes:
                    gr.HTML(palette_legend(classes))
                mode = gr.Radio(
                    list(MODES),
                    value="auto",
                    label="Condition preparation",
                    info=f"annotate: {ANNOTATION.get(task, 'nothing to annotate')}; auto: only "
                    "what is not a condition already",
                    elem_id="mode",
                )
                prompt, negative, num_samples, seed, steps, scheduler, guidance, (strength,) = (
                    text_and_sampling(gr, defaults, max_samples, [("Control strength", defaults.strength)])
                )
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                gallery, used, note = output_panel(gr)
                if examples:
                    gr.Examples(
                        [[str(e.image), e.prompt] for e in examples],
                        inputs=[condition, prompt],
                        label="Validation conditions of this run",
                    )
        inputs = [condition, prompt, negative, num_samples, seed, steps, guidance, strength, scheduler, mode]
        run.click(on_generate, inputs, [gallery, used, note], api_name=API_NAME)
        use.click(use_drawing, sketch, condition, api_visibility="private")
    return demo


def parameter_name(name: str) -> str:
    """A condition name as a Python identifier, for the API's parameter names (`canny` -> `canny`)."""
    return re.sub(r"\W", "_", name)


def multi_signature(names: Sequence[str], progress) -> inspect.Signature:
    """The signature gradio reads off the multi page's event (API parameter names, in order; the progress
    tracker found by its default): images, prompt and settings, strengths, scheduler and mode. Every
    parameter defaults to None, so a client may leave out any image (the others default to the page's
    values)."""
    P = inspect.Parameter
    keys = [parameter_name(name) for name in names]
    ordered = (
        [f"{key}_image" for key in keys]
        + ["prompt", "negative_prompt", "num_samples", "seed", "steps", "guidance_scale"]
        + [f"{key}_strength" for key in keys]
        + ["scheduler", "mode"]
    )
    params = [P(name, P.POSITIONAL_OR_KEYWORD, default=None) for name in ordered]
    return inspect.Signature([*params, P("progress", P.POSITIONAL_OR_KEYWORD, default=progress)])


def build_multi_app(
    model: ControlledModel,
    defaults: SamplingOptions,
    examples: Sequence[MultiExample] = (),
    title: str = "",
    max_samples: int = 8,
):
    """The page of a model of several conditions: one upload and one strength slider per condition (uploads
    only, no drawing); the API's inputs are in the order of the module docstring."""
    gr = import_gradio()
    names = split_condition(model.condition)
    k = len(names)
    strengths = condition_strengths(names, names, None, defaults.strength)  # sampling.strength's

    def on_generate(*args):
        *values, progress = args  # gradio appends the tracker where `multi_signature` declares it
        images, settings = values[:k], values[k : k + 6]
        given, (scheduler, mode) = values[k + 6 : 2 * k + 6], values[2 * k + 6 :]

        def report(done: int, total: int) -> None:
            progress((done, total), desc="denoising")

        by_name, strength = dict(zip(names, images, strict=True)), dict(zip(names, given, strict=True))
        return page_result(
            gr,
            lambda: generate_samples(model, defaults, by_name, *settings, strength, scheduler, mode, report),
        )

    on_generate.__signature__ = multi_signature(names, gr.Progress())

    with gr.Blocks(title=f"OFT-Control: {model.condition}", analytics_enabled=False) as demo:
        gr.Markdown(
            f"## OFT-Control: {' + '.join(names)} control at {model.resolution} px\n`{title}`\n\n"
            "Upload a condition image for any of the conditions; those left empty are not used."
        )
        with gr.Row():
            with gr.Column():
                with gr.Row():
                    uploads = {
                        name: condition_upload(gr, f"{name} condition", f"condition-{parameter_name(name)}")
                        for name in names
                    }
                annotations = "; ".join(
                    f"{name}: {ANNOTATION.get(name, 'nothing to annotate')}" for name in names
                )
                mode = gr.Radio(
                    list(MODES),
                    value="auto",
                    label="Condition preparation",
                    info=f"annotate: {annotations}; auto: only what is not a condition already",
                    elem_id="mode",
                )
                prompt, negative, num_samples, seed, steps, scheduler, guidance, sliders = text_and_sampling(
                    gr, defaults, max_samples, [(f"{name} strength", strengths[name]) for name in names]
                )
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                gallery, used, note = output_panel(gr)
                groups: dict[tuple[str, tuple[str, ...]], list[MultiExample]] = {}
                for example in examples:
                    groups.setdefault((example.source, tuple(example.images)), []).append(example)
                for (source, group), rows in groups.items():
                    gr.Examples(
                        [[str(e.images[name]) for name in group] + [e.prompt] for e in rows],
                        inputs=[uploads[name] for name in group] + [prompt],
                        label=f"Validation {'+'.join(group)} conditions of {source}",
                    )
        inputs = [
            *uploads.values(),
            prompt,
            negative,
            num_samples,
            seed,
            steps,
            guidance,
            *sliders,
            scheduler,
            mode,
        ]
        run.click(on_generate, inputs, [gallery, used, note], api_name=API_NAME)
    return demo


def launch(demo, server_name: str, server_port: int, allowed_paths: Sequence[str | Path] = ()) -> None:
    """Serve `demo` locally (one generation at a time) until interrupted; never a public share link."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own startup requests to itself
    demo.queue(default_concurrency_limit=1).launch(
        server_name=server_name,
        server_port=server_port,
        share=False,
        ssr_mode=False,
        inbrowser=False,
        allowed_paths=[str(p) for p in allowed_paths],
        css=CSS,
    )

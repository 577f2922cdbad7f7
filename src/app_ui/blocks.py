"""The Gradio app over a trained model: a condition (uploaded or drawn) and a prompt in, samples out.

Sampling is the library's: `generate_samples` calls `src.models.inference.generate_images` exactly as
`python -m src.generate` does, so a seed gives the same image in both. The event behind the Generate
button is the named API endpoint `generate`; its first two inputs are the condition image and the prompt
and the others default to the app's settings:

    Client(url).predict(handle_file("edges.png"), "a red circle", api_name="/generate")
    # -> (gallery [{"image": path, "caption": "seed 0"}, ...], condition used (path), note)

Analytics are off and nothing is fetched from the internet: no share link, no server-side rendering, and
the default theme's fonts ship inside the gradio wheel.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from src.app_ui.conditions import ANNOTATION, MODES, palette_classes, prepare_condition, to_uint8
from src.app_ui.examples import Example
from src.app_ui.uploads import guard_uploads
from src.models.inference import ControlledModel, generate_images
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


def generate_samples(
    model: ControlledModel,
    defaults: SamplingOptions,
    image: np.ndarray | None,
    prompt: str | None,
    negative_prompt: str | None = None,
    num_samples: int = 1,
    seed: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    strength: float | None = None,
    scheduler: str | None = None,
    mode: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> Generation:
    """Samples of `model` for one condition image and prompt; settings left None keep `defaults`.

    Raises ValueError, with a message meant for the page, for a missing or unusable image, an empty
    prompt or an invalid setting.
    """
    if image is None:
        raise ValueError(
            "No condition image: upload one, draw one (Draw tab, then 'Use drawing') or pick an example."
        )
    if not prompt or not prompt.strip():
        raise ValueError("The prompt is empty: describe the picture, e.g. 'a red circle and a blue square'.")
    try:
        prepared = prepare_condition(image, model.condition, model.resolution, mode)
    except ValueError as error:
        raise ValueError(f"This image cannot be used as a condition: {error}") from None
    given = {
        "scheduler": (scheduler, str),
        "num_inference_steps": (steps, int),
        "seed": (seed, int),
        "guidance_scale": (guidance_scale, float),
        "strength": (strength, float),
        "num_samples": (num_samples, int),
    }  # gradio gives numbers as floats
    settings = {k: cast(v) for k, (v, cast) in given.items() if v is not None}
    options = replace(defaults, negative_prompt=negative_prompt or None, **settings)
    images = generate_images(model, prepared.tensor[None], [prompt], options, progress)[0]
    return Generation(
        [to_uint8(x) for x in images],
        [options.seed + s for s in range(len(images))],
        to_uint8(prepared.tensor),
        prepared.note,
    )


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


def build_app(
    model: ControlledModel,
    defaults: SamplingOptions,
    examples: Sequence[Example] = (),
    title: str = "",
    max_samples: int = 8,
):
    """The `gradio.Blocks` app: condition and settings on the left, samples and the condition used on the right."""
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

        try:
            result = generate_samples(
                model,
                defaults,
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
                report,
            )
        except ValueError as error:
            raise gr.Error(str(error), print_exception=False) from None
        gallery = [(image, f"seed {s}") for image, s in zip(result.images, result.seeds, strict=True)]
        return gallery, result.condition, result.note

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
                        condition = guard_uploads(
                            gr.Image(
                                label="Condition image",
                                type="numpy",
                                image_mode="RGB",
                                sources=["upload", "clipboard"],
                                format="png",
                                elem_id="condition",
                            ),
                            gr,
                        )
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
                prompt = gr.Textbox(
                    label="Prompt", placeholder="a red circle and a blue square", elem_id="prompt"
                )
                negative = gr.Textbox(label="Negative prompt", value=defaults.negative_prompt or "")
                with gr.Accordion("Sampling", open=True):
                    with gr.Row():
                        num_samples = gr.Slider(
                            1, max_samples, value=defaults.num_samples, step=1, label="Samples"
                        )
                        seed = gr.Number(value=defaults.seed, precision=0, label="Seed (sample s: seed + s)")
                    with gr.Row():
                        steps = gr.Slider(1, 100, value=defaults.steps, step=1, label="Steps")
                        scheduler = gr.Dropdown(list(SCHEDULERS), value=defaults.scheduler, label="Scheduler")
                    with gr.Row():
                        guidance = gr.Slider(0, 20, value=defaults.guidance_scale, step=0.5, label="Guidance")
                        strength = gr.Slider(
                            0, 2, value=defaults.strength, step=0.05, label="Control strength"
                        )
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
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
                        label="Condition used",
                        height=200,
                        format="png",
                        interactive=False,
                        elem_id="condition-used",
                    )
                    note = gr.Markdown(elem_id="note")
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

"""Try a trained model in the browser: `python -m src.app` (Hydra; see conf/app.yaml).

    python -m src.app run=outputs/canny/runs/<date> server_port=7860

`run` is a training run directory, one of its checkpoints, or a folder exported by `python -m src.export`;
a list of runs on one backbone is composed as `python -m src.generate` composes them,

    python -m src.app run=[outputs/canny/runs/<date>,outputs/segmentation/runs/<date>]

and a model of several conditions (composed, jointly trained or their export) gets one upload and one
strength slider per condition (`src/app_ui/blocks.py`). The page takes a condition (uploaded, or drawn on a canvas; for canny a photo is turned into its edge
map) and a prompt, and shows the samples and the condition used; the `sampling` group (conf/sampling/)
sets the defaults of its controls. Loading and sampling are `python -m src.generate`'s: the same seed and
settings give the same image. A run that cannot be loaded stops the app before the server starts.
"""

from __future__ import annotations

import logging
import tempfile

import hydra
from omegaconf import DictConfig

from src.app_ui.blocks import build_app, launch
from src.app_ui.examples import multi_examples, validation_inputs, write_examples
from src.errors import InputError, one_line, take_debug_flag, user_errors
from src.models.inference import ControlledModel, load_controlled, rotation_scale_of, run_source
from src.models.multi import is_multi
from src.models.sampling import sampling_options

log = logging.getLogger(__name__)


def load_or_exit(cfg: DictConfig) -> ControlledModel:
    """The model of `cfg.run`, or an `InputError` whose one line says why it cannot be loaded (the entry
    point prints it and exits with status 2, before any server starts)."""
    source = run_source(cfg.run)
    try:
        scales = rotation_scale_of(cfg)
        return load_controlled(source, cfg.get("checkpoint"), cfg.get("model_path"), scales).to(cfg.device)
    except Exception as error:  # whatever the cause, the user gets one line and no server
        shown = source if isinstance(source, str) else "[" + ",".join(source) + "]"
        raise InputError(f"cannot load run '{shown}': {one_line(error)}") from None


def app(cfg: DictConfig) -> None:
    """Load the run of `cfg` (conf/app.yaml), build the page and serve it until interrupted."""
    options = sampling_options(cfg.sampling)
    model = load_or_exit(cfg)
    source = run_source(cfg.run)
    title = source if isinstance(source, str) else " + ".join(source)
    with tempfile.TemporaryDirectory(prefix="oft-control-app-") as folder:
        if is_multi(model.condition):
            examples = multi_examples(source, cfg.get("checkpoint"), model.resolution, cfg.examples, folder)
        else:
            single = source if isinstance(source, str) else source[0]  # run=[A]: one run
            inputs = validation_inputs(
                single, cfg.get("checkpoint"), model.condition, model.resolution, cfg.examples
            )
            examples = write_examples(inputs, folder)
        demo = build_app(model, options, examples, title=title, max_samples=cfg.max_samples)
        log.info(
            "serving %s (%s, %d px) on http://%s:%d",
            title,
            model.condition,
            model.resolution,
            cfg.server_name,
            cfg.server_port,
        )
        launch(demo, cfg.server_name, cfg.server_port, allowed_paths=[folder])


@hydra.main(version_base="1.3", config_path="../conf", config_name="app")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; errors users cause print one line and exit with status 2."""
    with user_errors():
        app(cfg)


if __name__ == "__main__":
    take_debug_flag()
    main()

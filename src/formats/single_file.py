"""The `single_file/` export: one checkpoint in the original Stable Diffusion (LDM) key layout.

`single_file/model.safetensors` holds the UNet with the rotations merged (`W R`), the VAE and the text
encoder(s) under the keys AUTOMATIC1111, Forge and ComfyUI load as a checkpoint (`src.formats.ldm`): SD1.x and
SD2.x as the original `ldm` code names them, SDXL as Stability's `sgm` code does in `sd_xl_base_1.0.safetensors`
(`label_emb` added embedding, both text encoders under `conditioner.embedders.0/1`).
`single_file/config/` holds the pipeline's configs, tokenizer(s) and DDIM scheduler without weights, so that
diffusers can load the file offline for any backbone shape:

    StableDiffusionPipeline.from_single_file("single_file/model.safetensors", config="single_file/config",
                                             local_files_only=True)

(SDXL: `StableDiffusionXLPipeline.from_single_file`, same arguments; `load_single_file` picks the class from
`config/model_index.json`.) For SD1.5 or SDXL base themselves `config=` may be left out when online: diffusers
then fetches their configs. The file holds no VAE scaling factor: the web UIs assume SD's 0.18215 (SDXL's
0.13025 for an SDXL file), `config/` carries the backbone's.

diffusers' `from_single_file` tells SDXL's two text encoders apart by width (768 and 1280 in SDXL): with a
backbone whose two encoders have the same width it reads the first one's tensors into both. Such a file is
still written (the keys are right; whether A1111, Forge or ComfyUI load such a backbone was not checked) and
`load_single_file` refuses it (one line).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from src.errors import ConfigError
from src.formats.ldm import check_backbone, ldm_state_dict
from src.models.sampling import build_pipeline, make_scheduler
from src.oft import merge_oft, unmerge_oft

SINGLE_FILE, CONFIG_DIR = "model.safetensors", "config"
XL_PIPELINE = "StableDiffusionXLPipeline"


def _text_encoder_2(module):
    return getattr(module, "text_encoder_2", None)


def check_single_file(module) -> None:
    """Refuse (one line, `ConfigError`) a backbone whose UNet, VAE or text encoder(s) have no LDM layout."""
    check_backbone(module.unet.config, module.vae.config, module.text_encoder, _text_encoder_2(module))


def merged_ldm_state_dict(module) -> dict:
    """The module's UNet (rotations merged), VAE and text encoder(s) in the LDM layout."""
    removed = merge_oft(module.unet)
    try:
        state = ldm_state_dict(module.unet, module.vae, module.text_encoder, _text_encoder_2(module))
        return {key: tensor.cpu().contiguous() for key, tensor in state.items()}
    finally:
        unmerge_oft(module.unet, removed)


def write_configs(module, folder: Path) -> Path:
    """`model_index.json` and every component's config (no weights), tokenizer(s) and a DDIM scheduler."""
    scheduler = make_scheduler("ddim", module.noise_scheduler.config)
    second = {}
    if _text_encoder_2(module) is not None:
        second = {"text_encoder_2": module.text_encoder_2, "tokenizer_2": module.tokenizer_2}
    pipe = build_pipeline(module.unet, module.vae, module.text_encoder, module.tokenizer, scheduler, **second)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_config(folder)
    module.unet.save_config(folder / "unet")
    module.vae.save_config(folder / "vae")
    module.text_encoder.config.save_pretrained(folder / "text_encoder")
    module.tokenizer.save_pretrained(folder / "tokenizer")
    if second:
        module.text_encoder_2.config.save_pretrained(folder / "text_encoder_2")
        module.tokenizer_2.save_pretrained(folder / "tokenizer_2")
    scheduler.save_config(folder / "scheduler")
    return folder


def export_single_file(run, folder: str | os.PathLike) -> Path:
    """Write `model.safetensors` (LDM layout, rotations merged) and `config/` into `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    state = merged_ldm_state_dict(run.module)  # refuses a non-SD1/SD2/SDXL layout before anything is written
    folder.mkdir(parents=True, exist_ok=True)
    info = {
        "condition": run.condition,
        "resolution": run.resolution,
        "identity": run.module.checkpoint_identity(),
    }
    metadata = {"format": "pt", "oft_control": json.dumps(info, default=str)}
    save_file(state, folder / SINGLE_FILE, metadata=metadata)
    write_configs(run.module, folder / CONFIG_DIR)
    return folder


def _check_xl_widths(config: Path) -> None:
    """Refuse SDXL text encoders of one width, which diffusers' loader cannot tell apart (one line)."""
    widths = [
        json.loads((config / part / "config.json").read_text())["hidden_size"]
        for part in ("text_encoder", "text_encoder_2")
    ]
    if widths[0] == widths[1]:
        raise ConfigError(
            f"both SDXL text encoders in {config} are {widths[0]} wide: diffusers' from_single_file tells them "
            "apart by width and would load the first into both; use the diffusers/ export of this backbone"
        )


def load_single_file(folder: str | os.PathLike, **kwargs):
    """A `StableDiffusionPipeline` (SDXL: `StableDiffusionXLPipeline`, no watermark unless asked) from an
    exported `single_file/` folder, with stock diffusers, offline."""
    import diffusers

    folder = Path(folder)
    config = folder / CONFIG_DIR
    name = json.loads((config / "model_index.json").read_text())["_class_name"]
    if name == XL_PIPELINE:
        _check_xl_widths(config)
        kwargs.setdefault("add_watermarker", False)
    cls = getattr(diffusers, XL_PIPELINE if name == XL_PIPELINE else "StableDiffusionPipeline")
    return cls.from_single_file(
        str(folder / SINGLE_FILE), config=str(config), local_files_only=True, **kwargs
    )

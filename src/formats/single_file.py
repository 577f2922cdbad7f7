"""The `single_file/` export: one checkpoint in the original Stable Diffusion (LDM) key layout.

`single_file/model.safetensors` holds the UNet with the rotations merged (`W R`), the VAE and the text
encoder under the keys AUTOMATIC1111, Forge and ComfyUI load as a checkpoint (`src.formats.ldm`).
`single_file/config/` holds the pipeline's configs, tokenizer and DDIM scheduler without weights, so that
diffusers can load the file offline for any backbone shape:

    StableDiffusionPipeline.from_single_file("single_file/model.safetensors", config="single_file/config",
                                             local_files_only=True)

(for SD1.5 itself `config=` may be left out when online: diffusers then fetches SD1.5's configs.) The file
holds no VAE scaling factor: the web UIs assume SD's 0.18215, `config/` carries the backbone's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from src.formats.ldm import check_text_encoder, check_unet, check_vae, ldm_state_dict
from src.models.sampling import build_pipeline, make_scheduler
from src.oft import merge_oft, unmerge_oft

SINGLE_FILE, CONFIG_DIR = "model.safetensors", "config"


def check_single_file(module) -> None:
    """Refuse (one line, `ConfigError`) a backbone whose UNet, VAE or text encoder has no LDM layout."""
    check_unet(module.unet.config)
    check_vae(module.vae.config)
    check_text_encoder(module.text_encoder)


def merged_ldm_state_dict(module) -> dict:
    """The module's UNet (rotations merged), VAE and text encoder in the LDM layout."""
    removed = merge_oft(module.unet)
    try:
        state = ldm_state_dict(module.unet, module.vae, module.text_encoder)
        return {key: tensor.cpu().contiguous() for key, tensor in state.items()}
    finally:
        unmerge_oft(module.unet, removed)


def write_configs(module, folder: Path) -> Path:
    """`model_index.json` and every component's config (no weights), tokenizer and a DDIM scheduler."""
    scheduler = make_scheduler("ddim", module.noise_scheduler.config)
    pipe = build_pipeline(module.unet, module.vae, module.text_encoder, module.tokenizer, scheduler)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_config(folder)
    module.unet.save_config(folder / "unet")
    module.vae.save_config(folder / "vae")
    module.text_encoder.config.save_pretrained(folder / "text_encoder")
    module.tokenizer.save_pretrained(folder / "tokenizer")
    scheduler.save_config(folder / "scheduler")
    return folder


def export_single_file(run, folder: str | os.PathLike) -> Path:
    """Write `model.safetensors` (LDM layout, rotations merged) and `config/` into `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    state = merged_ldm_state_dict(run.module)  # refuses a non-SD1/SD2 layout before anything is written
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


def load_single_file(folder: str | os.PathLike, **kwargs):
    """A `StableDiffusionPipeline` from an exported `single_file/` folder, with stock diffusers, offline."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    return StableDiffusionPipeline.from_single_file(
        str(folder / SINGLE_FILE), config=str(folder / CONFIG_DIR), local_files_only=True, **kwargs
    )

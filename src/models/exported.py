"""Exported folders: writing them from a trained run, and reading them back.

- `diffusers/`: a complete `StableDiffusionPipeline` (SDXL: `StableDiffusionXLPipeline`) folder whose UNet has
  the rotations merged into its weights (`W R`, zero inference overhead), a DDIM scheduler (the paper's sampler), the control encoder in
  `control_encoder/` and `oft_control.json` (where it came from). `load_exported` reads it.
- `peft/`: the UNet rotations as a peft OFT adapter (`adapter_config.json`, `adapter_model.safetensors`)
  for the base UNet (the mapping is `src.oft.peft_compat`).
- `control_encoder/`: the control encoder alone, `model.safetensors` plus `config.json` (its constructor
  arguments, condition and resolution); `load_control_encoder` reads it.
- `single_file/`: one checkpoint in the original SD (LDM) layout, rotations merged, for AUTOMATIC1111, Forge
  and ComfyUI (`src.formats.single_file`).
- `lora/`: the rotations as full weight differences for LoRA / LyCORIS loaders (`src.formats.lora_diff`).
- `controlnet_xs/`: the control encoder as a stock diffusers `ControlNetXSAdapter`, and `hint_embedding/`: as
  diffusers' `ControlNetConditioningEmbedding` for a forward hook (`src.formats.controlnet_xs`).

Without a list of formats, `src.export` writes every format the run's backbone can host (`unsupported`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from src.errors import ConfigError, InputError, MissingInputError, OutputError
from src.formats.controlnet_xs import (
    check_controlnet_xs,
    export_controlnet_xs,
    export_hint_embedding,
    hint_block_refusal,
)
from src.formats.lora_diff import export_lora
from src.formats.single_file import check_single_file, export_single_file
from src.models.control import ControlEncoder
from src.models.multi import MultiEncoder, compose_runs
from src.models.run import TrainedRun
from src.oft import merge_oft, unmerge_oft
from src.oft.peft_compat import peft_adapter

FORMATS = (
    "diffusers",
    "peft",
    "control_encoder",
    "single_file",
    "lora",
    "controlnet_xs",
    "hint_embedding",
    "ecosystem",
)
ENCODER_DIR, ENCODER_WEIGHTS, ENCODER_CONFIG = "control_encoder", "model.safetensors", "config.json"
ENCODER_FORMAT = "oft-control-encoder"
EXPORT_INFO = "oft_control.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
EXPORT_HINT = "export one with `python -m src.export --run RUN --out_dir DIR`"


# ------------------------------------------------------------------------------------- control encoder
def encoder_arguments(encoder: ControlEncoder) -> dict[str, Any]:
    """The constructor arguments of a control encoder (`stem` is absent from exports before it existed)."""
    return dict(encoder.arguments)


def encoder_config(encoder: nn.Module, condition: str, resolution: int) -> dict[str, Any]:
    """The control encoder's constructor arguments plus the condition it reads; with several conditions
    (`src.models.multi.MultiEncoder`, version 2) the arguments of each under `encoders`."""
    if isinstance(encoder, MultiEncoder):
        each = {name: encoder_arguments(part) for name, part in encoder.encoders.items()}
        return {
            "format": ENCODER_FORMAT,
            "version": 2,
            "encoders": each,
            "condition": condition,
            "resolution": resolution,
        }
    return {
        "format": ENCODER_FORMAT,
        "version": 1,
        **encoder_arguments(encoder),
        "condition": condition,
        "resolution": resolution,
    }


def write_control_encoder(
    encoder: nn.Module, condition: str, resolution: int, folder: str | os.PathLike
) -> Path:
    """Write a control encoder (or several) as `model.safetensors` + `config.json` into `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, folder / ENCODER_WEIGHTS, metadata={"format": "pt"})
    (folder / ENCODER_CONFIG).write_text(json.dumps(encoder_config(encoder, condition, resolution), indent=2))
    return folder


def export_control_encoder(run: TrainedRun, folder: str | os.PathLike) -> Path:
    """Write the run's control encoder as `model.safetensors` + `config.json` into `folder`."""
    return write_control_encoder(run.module.encoder, run.condition, run.resolution, folder)


def load_control_encoder(folder: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """The control encoder exported to `folder` (strictly loaded; a `MultiEncoder` for several conditions)
    and its config."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights = folder / ENCODER_CONFIG, folder / ENCODER_WEIGHTS
    if not config_path.is_file() or not weights.is_file():
        raise MissingInputError(
            f"'{folder}' holds no exported control encoder ({ENCODER_CONFIG} + {ENCODER_WEIGHTS}); "
            f"{EXPORT_HINT}"
        )
    config = json.loads(config_path.read_text())
    if config.get("format") != ENCODER_FORMAT:
        raise InputError(f"{config_path} is not an {ENCODER_FORMAT} config (format {config.get('format')!r})")

    def build(args: dict[str, Any]) -> ControlEncoder:
        return ControlEncoder(
            args["out_channels"],
            args["downscale"],
            args["channels"],
            args["in_channels"],
            stem=args.get("stem", "conv"),
        )

    if "encoders" in config:
        encoder: nn.Module = MultiEncoder({name: build(args) for name, args in config["encoders"].items()})
    else:
        encoder = build(config)
    encoder.load_state_dict(load_file(weights), strict=True)
    return encoder.eval().requires_grad_(False), config


# ------------------------------------------------------------------------------------- merged diffusers
class ExportExistsError(OutputError, FileExistsError):
    """The export would overwrite earlier exports."""


def prepare_out_dir(out_dir: Path, formats: Sequence[str], overwrite: bool) -> dict[str, Path]:
    """Target folders per format; refuses to write into non-empty ones unless `overwrite`."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ConfigError(f"unknown export format(s) {unknown or formats}; choose from {', '.join(FORMATS)}")
    targets = {name: out_dir / name for name in formats}
    busy = [str(p) for p in targets.values() if p.exists() and any(p.iterdir())]
    if busy and not overwrite:
        raise ExportExistsError(
            f"export folder(s) {busy} are not empty: choose another --out_dir or pass --overwrite"
        )
    for path in targets.values():
        shutil.rmtree(path, ignore_errors=True)
    return targets


def export_diffusers(run: TrainedRun, folder: str | os.PathLike) -> Path:
    """A `StableDiffusionPipeline` folder with `W R` merged into the UNet, plus the control encoder."""
    module, folder = run.module, Path(folder)
    removed = merge_oft(module.unet)
    try:
        module.pipeline("ddim").save_pretrained(folder, safe_serialization=True)
    finally:
        unmerge_oft(module.unet, removed)
    export_control_encoder(run, folder / ENCODER_DIR)
    info: dict[str, Any] = {
        "run": str(run.files.run_dir),
        "checkpoint": str(run.files.checkpoint),
        "identity": module.checkpoint_identity(),
        "condition": run.condition,
        "resolution": run.resolution,
    }
    (folder / EXPORT_INFO).write_text(json.dumps(info, indent=2))
    return folder


def export_composed(
    runs: Sequence[TrainedRun], folder: str | os.PathLike, rotation_scale: Mapping[str, Any] | None = None
) -> Path:
    """A diffusers folder of runs composed on one backbone (`src.models.multi.compose_runs`): the product of
    their rotations (each scaled by `rotation_scale`) merged into the UNet and every run's control encoder in
    `control_encoder/`, one per condition; `python -m src.generate run=<folder> +condition.<name>=...`
    samples it."""
    composed, folder = compose_runs(runs, rotation_scale), Path(folder)
    composed.module.pipeline("ddim").save_pretrained(folder, safe_serialization=True)  # rotations merged
    condition = composed.encoder.condition
    write_control_encoder(composed.encoder, condition, composed.resolution, folder / ENCODER_DIR)
    info = {
        "runs": [str(run.files.run_dir) for run in runs],
        "checkpoints": [str(run.files.checkpoint) for run in runs],
        "identities": [run.module.checkpoint_identity() for run in runs],
        "rotation_scales": composed.scales,
        "condition": condition,
        "resolution": composed.resolution,
    }
    (folder / EXPORT_INFO).write_text(json.dumps(info, indent=2))
    return folder


def is_exported(folder: str | os.PathLike) -> bool:
    """True for a folder written by `export_diffusers`."""
    folder = Path(folder)
    return (folder / "model_index.json").is_file() and (folder / ENCODER_DIR / ENCODER_CONFIG).is_file()


def load_exported(folder: str | os.PathLike):
    """`(pipeline, control encoder, encoder config)` of an exported diffusers folder."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if not is_exported(folder):
        raise MissingInputError(
            f"'{folder}' is not an exported OFT-Control folder (model_index.json and "
            f"{ENCODER_DIR}/): {EXPORT_HINT}"
        )
    index = json.loads((Path(folder) / "model_index.json").read_text())
    if index.get("_class_name") == StableDiffusionXLPipeline.__name__:  # an SDXL backbone's export
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            folder, safety_checker=None, requires_safety_checker=False
        )
    pipe.set_progress_bar_config(disable=True)
    encoder, config = load_control_encoder(Path(folder) / ENCODER_DIR)
    return pipe, encoder, config


# ------------------------------------------------------------------------------------- peft adapter
def export_peft(run: TrainedRun, folder: str | os.PathLike) -> Path:
    """Write the UNet rotations as a peft adapter folder (`adapter_config.json`, `adapter_model.safetensors`).

    COFT is off in the adapter: the exported rotations already satisfy the constraint, and peft would
    re-project them with its own radius convention at every forward.
    """
    from safetensors.torch import save_file

    from src.models.backbone import check_backbone

    folder = Path(folder)
    base = check_backbone(run.module.backbone_spec)
    peft_config, state = peft_adapter(run.module.unet, run.module.oft_config, base)
    peft_config.save_pretrained(str(folder))
    save_file(state, folder / PEFT_WEIGHTS, metadata={"format": "pt"})
    return folder


#: formats that take the rotations and encoder of OFT-Control; other methods export `ecosystem`
OFT_FORMATS = tuple(name for name in FORMATS if name != "ecosystem")
#: what a run of the control encoder alone (`method=encoder_only`) exports besides `ecosystem`
ENCODER_FORMATS = ("diffusers", "control_encoder")


def export_ecosystem(run: TrainedRun, folder: str | os.PathLike) -> Path:
    """The run's method in its own ecosystem's formats (`Method.save_ecosystem`): ControlNet and T2I-Adapter
    `save_pretrained` folders, LoRA as a peft adapter, a full finetune's UNet, each with its control encoder."""
    from src.models.methods import save_ecosystem

    save_ecosystem(run, Path(folder))
    return Path(folder)


#: formats that carry the control (the encoder), not only the UNet's rotations
CONTROL_FORMATS = ("diffusers", "control_encoder", "controlnet_xs", "hint_embedding")


def unsupported(run: TrainedRun, name: str) -> str | None:
    """Why the run (its method or backbone) cannot have format `name` (the `ConfigError` line), or None."""
    method_object = getattr(run.module, "method", None)
    method = getattr(method_object, "name", "oft_control")
    encoder_only = method == "encoder_only" and name in ENCODER_FORMATS
    if name in OFT_FORMATS and method != "oft_control" and not encoder_only:
        return f"exports OFT-Control runs (method oft_control) and this run's method is {method!r}: use --formats ecosystem"
    if name == "ecosystem" and method == "oft_control":
        return "OFT-Control's own formats are the others (diffusers, peft, control_encoder, ...)"
    if not getattr(method_object, "encoder_holds_control", True) and name in CONTROL_FORMATS:
        return (
            "holds the control encoder alone, without method.multiscale's per-block heads (an experimental "
            "lever with no export of its control yet): export its rotations with --formats peft"
        )
    if isinstance(getattr(run.module, "encoder", None), MultiEncoder) and name in (
        "controlnet_xs",
        "hint_embedding",
    ):
        return f"holds one condition's encoder and this run reads '{run.condition}': use diffusers or control_encoder"
    hint_block = name in ("controlnet_xs", "hint_embedding")
    if hint_block and (why := hint_block_refusal(getattr(run.module, "encoder", None))):
        return why
    checks = {
        "single_file": lambda: check_single_file(run.module),
        "controlnet_xs": lambda: check_controlnet_xs(run.module.unet, getattr(run.module, "encoder", None)),
    }
    try:
        checks.get(name, lambda: None)()
    except ConfigError as error:
        return str(error)
    return None


WRITERS = {
    "diffusers": export_diffusers,
    "peft": export_peft,
    "control_encoder": export_control_encoder,
    "single_file": export_single_file,
    "lora": export_lora,
    "controlnet_xs": export_controlnet_xs,
    "hint_embedding": export_hint_embedding,
    "ecosystem": export_ecosystem,
}

"""Text encoders in the original Stable Diffusion (LDM) layout: SD1's CLIP, SD2's OpenCLIP and SDXL's pair.

- SD1.x (CLIP ViT-L, `quick_gelu`): the transformers state dict under `cond_stage_model.transformer.text_model.`.
- SD2.x (OpenCLIP ViT-H, `gelu`): `cond_stage_model.model.` with OpenCLIP's names: `token_embedding`,
  `positional_embedding`, `transformer.resblocks.i.{ln_1, attn.in_proj_weight/bias (q, k, v stacked),
  attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`, `ln_final`. diffusers' SD2 text encoder holds the 23 layers SD2
  uses (the penultimate output of OpenCLIP's 24) and no `text_projection`: both are written as they are, the
  missing last block and projection being unused by SD2's penultimate-layer conditioning.

- SDXL (Stability's `sgm` layout): CLIP ViT-L (`text_encoder`, a `CLIPTextModel`) as transformers holds it under
  `conditioner.embedders.0.transformer.text_model.`, OpenCLIP bigG (`text_encoder_2`, a
  `CLIPTextModelWithProjection`) under `conditioner.embedders.1.model.` in OpenCLIP's names as above, all its
  layers, plus `text_projection`: OpenCLIP multiplies `x @ text_projection`, so it is transformers'
  `text_projection.weight` transposed (`[width, projection]`). No `logit_scale` (a text-only model has none;
  the UNet does not read it).

Which one a lone `CLIPTextModel` is follows from its activation: CLIP ViT-L's `quick_gelu` against OpenCLIP's
`gelu`; in SDXL's pair the position says it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from src.errors import ConfigError

CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
XL_CLIP_PREFIX, XL_OPEN_CLIP_PREFIX = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
XL_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
OPEN_CLIP_FIXED = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def check_text_encoder(model) -> None:
    """Refuse (one line) a text encoder with no LDM layout: anything but a transformers `CLIPTextModel`."""
    name = type(model).__name__
    if name != "CLIPTextModel":
        raise ConfigError(
            f"the backbone's text encoder has no original Stable Diffusion (LDM) layout: {name} (SD1.x and "
            "SD2.x checkpoints hold a CLIPTextModel); single_file writes SD1/SD2/SDXL-class backbones only, "
            "export the diffusers/ folder instead"
        )


def check_text_encoders(model, model_2=None) -> None:
    """Refuse (one line) text encoders with no LDM layout: SD1/SD2's one `CLIPTextModel`, or SDXL's pair
    (`CLIPTextModel`, `CLIPTextModelWithProjection`)."""
    if model_2 is None:
        check_text_encoder(model)
        return
    names = (type(model).__name__, type(model_2).__name__)
    if names != XL_CLASSES:
        raise ConfigError(
            f"the backbone's text encoders have no SDXL (LDM) layout: {', '.join(names)} (SDXL checkpoints "
            f"hold {', '.join(XL_CLASSES)}); export the diffusers/ folder instead"
        )


def is_open_clip(model) -> bool:
    """SD2's OpenCLIP text encoder (activation `gelu`) rather than SD1's CLIP ViT-L (`quick_gelu`)."""
    return model.config.hidden_act == "gelu"


def _flat(model) -> dict[str, Tensor]:
    """The state dict without transformers' optional `text_model.` level (flattened in transformers 5.6)."""
    return {k.removeprefix("text_model."): v.detach() for k, v in model.state_dict().items()}


def open_clip_state(model) -> dict[str, Tensor]:
    """An SD2 (or SDXL's second) text encoder in OpenCLIP's names (q, k, v stacked into `in_proj`), without
    prefix."""
    state, out = _flat(model), {}
    for key, value in state.items():
        if key in OPEN_CLIP_FIXED:
            out[OPEN_CLIP_FIXED[key]] = value
            continue
        if key == "text_projection.weight":  # SDXL's bigG; OpenCLIP's is the transpose
            out["text_projection"] = value.T.contiguous()
            continue
        layer, _, rest = key.removeprefix("encoder.layers.").partition(".")
        module, _, kind = rest.rpartition(".")
        if module in ("self_attn.q_proj", "self_attn.k_proj"):
            continue  # stacked with v_proj below
        if module == "self_attn.v_proj":
            parts = [state[f"encoder.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(parts)
        elif module in OPEN_CLIP_LAYER:
            out[f"transformer.resblocks.{layer}.{OPEN_CLIP_LAYER[module]}.{kind}"] = value
        else:
            raise ConfigError(f"the OpenCLIP text encoder's parameter {key!r} has no LDM name")
    return out


def text_state_dict(model, model_2=None) -> dict[str, Tensor]:
    """The text encoder under its LDM prefix: OpenCLIP's layout for SD2, CLIP's for SD1; with SDXL's second
    text encoder `model_2`, both under `conditioner.embedders.0/1`."""
    check_text_encoders(model, model_2)
    if model_2 is not None:
        return {
            **{f"{XL_CLIP_PREFIX}text_model.{k}": v for k, v in _flat(model).items()},
            **{XL_OPEN_CLIP_PREFIX + k: v for k, v in open_clip_state(model_2).items()},
        }
    if is_open_clip(model):
        return {OPEN_CLIP_PREFIX + k: v for k, v in open_clip_state(model).items()}
    return {f"{CLIP_PREFIX}text_model.{k}": v for k, v in _flat(model).items()}

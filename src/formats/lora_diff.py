"""The `lora/` export: the rotations as full weight differences for the common LoRA / LyCORIS loaders.

`lora/lora.safetensors` holds, for every rotated layer, `lora_unet_<layer>.diff = W R - W` (kohya's naming:
`lora_unet_` plus the diffusers module name with `.` replaced by `_`, the names AUTOMATIC1111's, Forge's and
ComfyUI's loaders map onto their own modules; LyCORIS's "full" algorithm stores a layer as `.diff`).
Added to the base checkpoint's weight at strength 1 it gives our merged weight `W R` up to one float
rounding; other strengths scale the difference, not the rotation angle.

Why not those loaders' OFT format: their `oft_blocks` (`[n_blocks, b, b]` Cayley rotations, LyCORIS
`diag-oft`) rotate the *output* rows of the weight, `R W`; ours rotates the input side, `W R`, so a block
rotation of ours is in general no block rotation of theirs, and the difference is exact for any layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from src.oft import oft_layers

LORA_FILE = "lora.safetensors"
PREFIX = "lora_unet_"


def kohya_name(module_name: str) -> str:
    """`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` -> `lora_unet_down_blocks_0_..._to_q`."""
    return PREFIX + module_name.replace(".", "_")


@torch.no_grad()
def weight_differences(unet) -> dict[str, Tensor]:
    """`{lora_unet_<layer>.diff: W R - W}` for every OFT layer of `unet` (float32, in the base's shape)."""
    out = {}
    for name, layer in oft_layers(unet):
        base = layer.base.weight.float()
        merged = layer.rotated_weight().float()
        out[f"{kohya_name(name)}.diff"] = (merged - base).cpu().contiguous()
    return out


def export_lora(run, folder: str | os.PathLike) -> Path:
    """Write `lora.safetensors` (one `.diff` per rotated UNet layer) into `folder`."""
    from safetensors.torch import save_file

    state = weight_differences(run.module.unet)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": "pt",
        "ss_network_module": "lycoris.kohya",
        "ss_network_args": json.dumps({"algo": "full"}),
        "oft_control": json.dumps({"condition": run.condition, "layers": len(state)}),
    }
    save_file(state, folder / LORA_FILE, metadata=metadata)
    return folder

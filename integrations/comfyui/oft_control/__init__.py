"""ComfyUI nodes for OFT-Control: load an exported control encoder and add its embedding after the UNet's
first input block (`conv_in`), as OFT-Control trains and samples it.

Install: copy this folder into `ComfyUI/custom_nodes/`. Export a run with `python -m src.export --run RUN
--out_dir DIR`, load `DIR/single_file/model.safetensors` with "Load Checkpoint" (the rotations are merged in
it), then

    OFT-Control Encoder Loader (folder = DIR/control_encoder) -> OFT-Control Apply (model, image, strength)

and sample the returned MODEL as usual. The condition IMAGE is what `python -m src.generate` reads (e.g. a
canny edge map, white on black) at the image's resolution; another size is resized bilinearly. The control
is added in every batch the UNet sees, so both classifier-free guidance branches keep it, as in training.

This file needs only torch and safetensors (both ship with ComfyUI), not the OFT-Control project.
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

ENCODER_FORMAT = "oft-control-encoder"
WEIGHTS, CONFIG = "model.safetensors", "config.json"
ENCODER_TYPE = "OFT_CONTROL_ENCODER"


class ControlEncoder(nn.Module):
    """The exported encoder's layers, built from its `config.json`: 3x3 convolutions with SiLU, then `zero_out`
    to the UNet's first width. Stem `conv`: one stride-2 stage per factor 2 of the VAE's downscale; stem
    `unshuffle`: the condition's downscale x downscale patches folded into channels first, every stage at
    stride 1."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        stages, downscale = round(math.log2(config["downscale"])), int(config["downscale"])
        widths = list(config["channels"][: stages + 1])
        unshuffle = config.get("stem", "conv") == "unshuffle"
        layers: list[nn.Module] = (
            [
                nn.PixelUnshuffle(downscale),
                nn.Conv2d(config["in_channels"] * downscale**2, widths[0], 3, padding=1),
            ]
            if unshuffle
            else [nn.Conv2d(config["in_channels"], widths[0], 3, padding=1)]
        )
        layers.append(nn.SiLU())
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=False):
            layers += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.SiLU()]
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, stride=1 if unshuffle else 2), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.zero_out = nn.Conv2d(widths[-1], config["out_channels"], 3, padding=1)
        self.downscale = downscale

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        return self.zero_out(self.body(condition))


def load_control_encoder(folder: str) -> ControlEncoder:
    """The encoder exported to `folder` (`config.json` + `model.safetensors`), strictly loaded, eval mode."""
    from safetensors.torch import load_file

    config_path, weights = os.path.join(folder, CONFIG), os.path.join(folder, WEIGHTS)
    if not (os.path.isfile(config_path) and os.path.isfile(weights)):
        raise FileNotFoundError(f"'{folder}' holds no exported OFT-Control encoder ({CONFIG} + {WEIGHTS})")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("format") != ENCODER_FORMAT:
        raise ValueError(f"{config_path} is not an {ENCODER_FORMAT} config (format {config.get('format')!r})")
    encoder = ControlEncoder(config)
    encoder.load_state_dict(load_file(weights), strict=True)
    return encoder.eval().requires_grad_(False)


class ControlPatch:
    """An `input_block_patch`: adds `strength * encoder(image)` to the output of input block 0 (`conv_in`)."""

    def __init__(self, encoder: ControlEncoder, image: torch.Tensor, strength: float) -> None:
        self.encoder, self.strength = encoder, strength
        self.condition = image.movedim(-1, 1)[:, :3]  # ComfyUI IMAGE [B, H, W, C] -> [B, 3, H, W]
        self.cache: dict = {}

    def embedding(self, h: torch.Tensor) -> torch.Tensor:
        """The embedding for `h`'s grid, computed once per grid, device and dtype (in at least float32)."""
        dtype = torch.promote_types(h.dtype, torch.float32)
        key = (tuple(h.shape[-2:]), h.device, dtype)
        if key not in self.cache:
            size = (h.shape[-2] * self.encoder.downscale, h.shape[-1] * self.encoder.downscale)
            condition = self.condition.to(h.device, dtype)
            if tuple(condition.shape[-2:]) != size:
                condition = F.interpolate(condition, size=size, mode="bilinear", align_corners=False)
            with torch.no_grad():
                self.cache[key] = self.strength * self.encoder.to(h.device, dtype)(condition)
        return self.cache[key]

    def __call__(self, h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        if transformer_options.get("block") != ("input", 0):
            return h
        embedding = self.embedding(h)
        if h.shape[0] % embedding.shape[0]:
            raise ValueError(
                f"latent batch {h.shape[0]} is not a multiple of the condition batch {embedding.shape[0]}"
            )
        return h + embedding.repeat(h.shape[0] // embedding.shape[0], 1, 1, 1).to(h.dtype)


class OFTControlEncoderLoader:
    """Node: an exported `control_encoder/` folder -> OFT_CONTROL_ENCODER."""

    CATEGORY = "conditioning/oft_control"
    RETURN_TYPES = (ENCODER_TYPE,)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"folder": ("STRING", {"default": "", "multiline": False})}}

    def load(self, folder: str):
        return (load_control_encoder(folder),)


class OFTControlApply:
    """Node: MODEL + OFT_CONTROL_ENCODER + condition IMAGE -> MODEL with the control after `conv_in`."""

    CATEGORY = "conditioning/oft_control"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "control_encoder": (ENCODER_TYPE,),
                "image": ("IMAGE",),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
            }
        }

    def apply(self, model, control_encoder: ControlEncoder, image: torch.Tensor, strength: float):
        if strength == 0:
            return (model,)
        patched = model.clone()
        patched.set_model_input_block_patch(ControlPatch(control_encoder, image, strength))
        return (patched,)


NODE_CLASS_MAPPINGS = {"OFTControlEncoderLoader": OFTControlEncoderLoader, "OFTControlApply": OFTControlApply}
NODE_DISPLAY_NAME_MAPPINGS = {
    "OFTControlEncoderLoader": "OFT-Control Encoder Loader",
    "OFTControlApply": "OFT-Control Apply",
}

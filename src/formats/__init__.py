"""Export formats for the tools people generate with (written by `python -m src.export`):

- `ldm`: diffusers state dicts in the original Stable Diffusion (LDM) key layout;
- `single_file`: one LDM-layout checkpoint (SD1.x, SD2.x, SDXL) with the rotations merged (AUTOMATIC1111,
  Forge, ComfyUI, diffusers' `from_single_file`);
- `lora_diff`: the rotations as `lora_unet_<layer>.diff` full weight differences (LoRA / LyCORIS loaders);
- `controlnet_xs`: the control encoder as a stock diffusers `ControlNetXSAdapter`.
"""

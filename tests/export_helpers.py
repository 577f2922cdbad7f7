"""Backbones and runs the export tests share (imported as `export_helpers`; pytest puts tests/ on sys.path).

The SD1.5-architecture backbone is SD1.5's configs (`src/models/sd15/`) with narrow widths: the same blocks,
layers, attention heads (8) and GroupNorm groups (32; the original LDM code fixes both) and the same LDM key
set as SD1.5, random weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from helpers import make_trained_run

SD15 = Path(__file__).resolve().parents[1] / "src/models/sd15"
COMPONENTS = ("unet", "vae", "text_encoder")
NARROW_UNET = dict(block_out_channels=[32, 64, 64, 64], cross_attention_dim=32, sample_size=8)
NARROW_VAE = dict(block_out_channels=[32, 32, 64, 64], sample_size=64)
NARROW_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, projection_dim=32
)


#: SD2.1's public configs where they differ from SD1.5's: OpenCLIP ViT-H text encoder (23 of its 24 layers, gelu),
#: 1024-wide cross-attention, linear transformer projections, heads per level
SD21_UNET = dict(
    attention_head_dim=[5, 10, 20, 20],
    cross_attention_dim=1024,
    use_linear_projection=True,
    upcast_attention=True,
)
SD21_TEXT = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_attention_heads=16,
    num_hidden_layers=23,
    hidden_act="gelu",
    projection_dim=512,
)


def sd21_configs(narrow: bool = True) -> tuple[dict, dict, dict]:
    """UNet, VAE and text-encoder configs of SD2.1, narrowed to test size (keeping gelu) if `narrow`."""
    unet, vae, text = sd15_configs(narrow=False)
    unet, text = {**unet, **SD21_UNET}, {**text, **SD21_TEXT}
    if narrow:
        unet = {**unet, **NARROW_UNET, "attention_head_dim": [2, 4, 4, 4]}
        vae, text = {**vae, **NARROW_VAE}, {**text, **NARROW_TEXT}
    return unet, vae, text


def sd15_configs(narrow: bool = True) -> tuple[dict, dict, dict]:
    """UNet, VAE and text-encoder configs of SD1.5, narrowed to test size if `narrow`."""
    unet, vae, text = (json.loads((SD15 / f"{n}_config.json").read_text()) for n in COMPONENTS)
    text.pop("vocab_size")  # the locally built tokenizer sets it
    if narrow:
        unet, vae, text = {**unet, **NARROW_UNET}, {**vae, **NARROW_VAE}, {**text, **NARROW_TEXT}
    return unet, vae, text


def write_sd15_folder(path: Path) -> Path:
    """A random-weight diffusers folder with SD1.5's architecture at narrow widths."""
    from src.models.tiny import build_tiny_pipeline

    unet, vae, text = sd15_configs()
    build_tiny_pipeline(seed=3, unet=unet, vae=vae, text=text).save_pretrained(path, safe_serialization=True)
    return path


def make_sd15_run(root: Path) -> tuple[Path, Path]:
    """`(backbone folder, run directory)`: a trained-looking run (`helpers.make_trained_run`) on the
    SD1.5-architecture backbone at 64 px."""
    folder = write_sd15_folder(root / "backbone")
    run = make_trained_run(
        root / "run",
        "model=sd15",
        f"model.path={folder}",
        "model.resolution=64",
        "model.local_files_only=true",
    )
    return folder, run

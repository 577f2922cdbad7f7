"""A tiny Stable-Diffusion-format backbone built locally, so everything runs offline on a CPU.

The folder it writes has the same layout as a diffusers SD1.5 checkpoint (`model_index.json`, `unet/`,
`vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`) and is loaded through exactly the same
`from_pretrained` code path. Weights are random but seeded, so the folder is deterministic. The VAE keeps
SD's downsampling factor of 8 and the UNet keeps cross-attention transformer blocks with the same
module names as SD1.5, so OFT targets, the control encoder and sampling behave as at full scale.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

TINY_VERSION = "tiny-sd-v1"
"""Bump when the architecture below changes, so caches built by an older version are not reused."""

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(8, 16, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
)
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=77,
    projection_dim=32,
)
TINY_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
    clip_sample=False,
)


def _byte_alphabet() -> list[str]:
    """The 256 printable characters that byte-level BPE (as CLIP's tokenizer uses) maps bytes to."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(shifted)}
    return [table[b] for b in range(256)]


def build_tokenizer():
    """A character-level CLIP tokenizer generated locally: every byte, alone or ending a word, no merges."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    tokens = alphabet + [ch + "</w>" for ch in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TINY_TEXT["max_position_embeddings"])


def build_tiny_pipeline(seed: int = 0):
    """Random-weight SD components of tiny size, seeded, as a `StableDiffusionPipeline`."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    specials = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **specials, **TINY_TEXT)
    text_encoder = CLIPTextModel(text_config)
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DDPMScheduler(**TINY_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def ensure_tiny_backbone(cache_dir: str | os.PathLike) -> Path:
    """Return the tiny backbone folder under `cache_dir`, building it on first use.

    The folder is written to a temporary sibling and renamed into place, so an interrupted build never
    leaves a half-written backbone that a later run would load.
    """
    target = Path(cache_dir).expanduser() / TINY_VERSION
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{TINY_VERSION}-", dir=target.parent))
    try:
        build_tiny_pipeline().save_pretrained(staging, safe_serialization=True)
        (staging / "oft_control_tiny.json").write_text(json.dumps({"version": TINY_VERSION}))
        try:
            os.rename(staging, target)
        except OSError:  # another process finished the same build first
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target

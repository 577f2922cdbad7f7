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


def build_tokenizer(words: tuple[str, ...] = (), max_length: int = TINY_TEXT["max_position_embeddings"]):
    """A CLIP tokenizer generated locally: every byte, alone or ending a word, plus BPE merges that make
    each of ``words`` one token (any other text still tokenizes, character by character)."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    tokens = alphabet + [ch + "</w>" for ch in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    merges: list[tuple[str, str]] = []
    for _ in range(8):  # a merge learnt for one word can pre-empt another's; repair until all are whole
        tokenizer = CLIPTokenizer(
            vocab={t: i for i, t in enumerate(tokens)}, merges=list(merges), model_max_length=max_length
        )
        split = {w: tokenizer.tokenize(w) for w in words}
        broken = {w: pieces for w, pieces in split.items() if len(pieces) > 1}
        if not broken:
            return tokenizer
        for pieces in broken.values():
            for piece in pieces[1:]:
                merge = (pieces[0], piece)
                pieces[0] = pieces[0] + piece
                if merge not in merges:
                    merges.append(merge)
                if pieces[0] not in tokens:
                    tokens.append(pieces[0])
    raise RuntimeError(f"could not build whole-word tokens for {sorted(broken)}")


def build_tiny_pipeline(
    seed: int = 0,
    unet: dict = TINY_UNET,
    vae: dict = TINY_VAE,
    text: dict = TINY_TEXT,
    words: tuple[str, ...] = (),
    scheduler_class: str = "DDPMScheduler",
):
    """Random-weight SD components of the given sizes (tiny by default), seeded, as a `StableDiffusionPipeline`."""
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer(words, text["max_position_embeddings"])
    torch.manual_seed(seed)
    specials = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **specials, **text
    )
    return StableDiffusionPipeline(
        unet=UNet2DConditionModel(**unet),
        vae=AutoencoderKL(**vae),
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer,
        scheduler=getattr(diffusers, scheduler_class)(**TINY_SCHEDULER),
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

"""The toy backbone's architecture: the sizes of the model that `python -m src.pretrain` trains and
`assets/toy-sd/` ships (a three-level UNet with cross-attention at 8x8 and 4x4 latents, a factor-8 VAE
and a 2-layer CLIP text encoder whose tokenizer knows the toy world's words whole).

They are the tiny test backbone's configs (`src.models.tiny`) widened where the toy world needs it, and
built by the same `build_tiny_pipeline`, so the toy model keeps SD1.5's module names and folder layout.
"""

from __future__ import annotations

from src.models.tiny import TINY_TEXT, TINY_UNET, TINY_VAE, build_tiny_pipeline
from src.toy.world import COLOURS, SHAPES

TOY_UNET = dict(
    TINY_UNET,
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
)
TOY_VAE = dict(TINY_VAE, block_out_channels=(16, 32, 64, 64))
TOY_TEXT = dict(
    TINY_TEXT, hidden_size=64, intermediate_size=128, max_position_embeddings=16, projection_dim=64
)


def toy_words() -> tuple[str, ...]:
    """Every word of the caption grammar (each becomes one token)."""
    return ("a", "and", *COLOURS, *SHAPES)


def build_toy_pipeline(seed: int):
    """The toy backbone's architecture with fresh weights (seeded), before pretraining."""
    return build_tiny_pipeline(
        seed, TOY_UNET, TOY_VAE, TOY_TEXT, toy_words(), scheduler_class="DDIMScheduler"
    )

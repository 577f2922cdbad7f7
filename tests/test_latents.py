"""The latent cache: a seen image is not re-encoded, and a cached step draws what an uncached one draws."""

from __future__ import annotations

import pytest
import torch
from test_module import _module

from src.models.latents import LatentCache

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(count: int = 4) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(count, 3, 64, 64) * 2 - 1


def test_cached_latents_equal_uncached_ones_draw_for_draw():
    module = _module()
    images = _images()
    torch.manual_seed(7)
    plain = [module.encode_images(images) for _ in range(2)]
    module.latent_cache = LatentCache(1.0)
    torch.manual_seed(7)
    cached = [module.encode_images(images) for _ in range(2)]  # the second call is all hits
    assert module.latent_cache.misses == 4 and module.latent_cache.hits == 4
    for a, b in zip(plain, cached, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)  # same posterior, same random numbers
    assert not torch.allclose(cached[0], cached[1])  # a fresh draw each time, not a frozen latent


def test_a_mirrored_image_is_another_entry_and_mixed_batches_keep_their_order():
    module = _module()
    module.latent_cache = LatentCache(1.0)
    images = _images(3)
    module.encode_images(images[:2])
    mixed = torch.stack([images[2], images[0], images[0].flip(-1), images[1]])
    mean, std = module.latent_cache.posterior(mixed, module._posterior)
    assert module.latent_cache.hits == 2 and module.latent_cache.misses == 2 + 2
    reference = module.vae.encode(mixed).latent_dist
    torch.testing.assert_close(mean, reference.mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(std, reference.std, rtol=0, atol=1e-6)


def test_the_cache_stays_within_its_size_and_is_off_at_zero_or_off_the_cpu():
    module = _module()
    entry = 2 * 4 * 8 * 8 * 4  # mean and std of a 4 x 8 x 8 fp32 latent
    module.latent_cache = LatentCache(2.5 * entry / 2**20)  # room for two entries
    module.encode_images(_images(4))
    assert len(module.latent_cache.store) == 2 and module.latent_cache.bytes == 2 * entry
    assert not LatentCache(0).applies(_images(1))
    assert not LatentCache(1.0).applies(torch.empty(1, 3, 64, 64, device="meta"))
    half = _images(1).to(torch.bfloat16)  # a bf16 VAE's inputs (numpy has no bfloat16)
    assert LatentCache.digest(half[0]) != LatentCache.digest(half[0].flip(-1))
    with pytest.raises(ValueError, match="latent cache of -1 MB"):
        LatentCache(-1)

"""The frozen VAE's posterior of each distinct training image, kept so an image seen again is not re-encoded.

A small dataset trained for many epochs spends a large share of each CPU step re-encoding the same pixels
with a frozen VAE: the demo's 1024 scenes (in two mirror images) are each drawn about eight times in 500
steps at batch 16, and the VAE encoder is a sixth of the step. `LatentCache` keys an image by a digest of
its exact pixel bytes (a crop or a mirror is another entry), keeps the posterior's mean and std, and draws
latents as `mean + std * randn` with the random numbers `latent_dist.sample()` would draw, so a cached step
equals an uncached one to float precision (the VAE run on another batch composition).

It applies to images on the CPU only: on an accelerator the VAE is cheap next to the UNet and a digest of
the pixels would first copy them to the host. The cache is bounded by `max_mb`; once full, new images are
encoded and not kept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch


class LatentCache:
    """Posterior (mean, std) by pixel digest, at most `max_mb` megabytes of them; counts hits and misses."""

    def __init__(self, max_mb: float) -> None:
        if max_mb < 0:
            raise ValueError(f"latent cache of {max_mb} MB: give 0 (off) or a positive size")
        self.max_bytes = int(max_mb * 2**20)
        self.store: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        self.bytes = self.hits = self.misses = 0

    @staticmethod
    def digest(image: torch.Tensor) -> bytes:
        raw = image.contiguous().view(-1).view(torch.uint8)  # any dtype's bytes (numpy has no bfloat16)
        return hashlib.blake2b(raw.numpy().tobytes(), digest_size=16).digest()

    def applies(self, images: torch.Tensor) -> bool:
        return self.max_bytes > 0 and images.device.type == "cpu"

    def posterior(
        self, images: torch.Tensor, encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of each image's posterior; `encode(images) -> (mean, std)` runs for the misses only."""
        keys = [self.digest(image) for image in images]
        missing = [i for i, key in enumerate(keys) if key not in self.store]
        fresh: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if missing:
            mean, std = encode(images[missing])
            fresh = {i: (mean[j], std[j]) for j, i in enumerate(missing)}
            for i, (m, s) in fresh.items():
                size = (m.numel() + s.numel()) * m.element_size()
                if keys[i] not in self.store and self.bytes + size <= self.max_bytes:
                    self.store[keys[i]] = (m.clone(), s.clone())
                    self.bytes += size
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        pairs = [fresh[i] if i in fresh else self.store[key] for i, key in enumerate(keys)]
        return torch.stack([m for m, _ in pairs]), torch.stack([s for _, s in pairs])


def sample_latents(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """A draw from the diagonal Gaussian posterior, with the random numbers diffusers' `sample()` draws."""
    return mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)

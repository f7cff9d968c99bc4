"""Pixel permutations: one fixed shuffle of the H*W positions, the same for every channel.

The PiT paper's instrument: a model with no built-in locality should not care whether the
pixels arrive in their natural order, as long as every image is shuffled the same way.
"""

from __future__ import annotations

import torch


def random_permutation(num_pixels: int, seed: int) -> torch.Tensor:
    """A seeded permutation of range(num_pixels), the same on every machine."""
    return torch.randperm(num_pixels, generator=torch.Generator().manual_seed(seed))


def permute_pixels(images: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """out[..., p] = images[..., permutation[p]] over flattened pixel positions p."""
    batch, chans, height, width = images.shape
    if permutation.numel() != height * width:
        raise ValueError(f"permutation has {permutation.numel()} entries for {height}x{width} images")
    return images.reshape(batch, chans, height * width)[:, :, permutation].reshape(batch, chans, height, width)


def invert_permutation(permutation: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(permutation)
    inverse[permutation] = torch.arange(permutation.numel(), device=permutation.device)
    return inverse

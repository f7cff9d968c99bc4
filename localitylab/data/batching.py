"""Batches cut, augmented and normalised on the training device.

The data set lives on the device as uint8; each step gathers a batch by index, applies a
random crop with zero padding and (where the data set allows) a horizontal flip, all as
tensor operations over the whole batch. This is the same distribution as torchvision's
RandomCrop(size, padding) + RandomHorizontalFlip, without a Python loop or a CPU worker.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Pad every side by `padding` with zeros, then take a random HxW window per image."""
    if padding <= 0:
        return images
    batch, chans, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator, device=generator.device)
    offsets = offsets.to(images.device)
    rows = (offsets[0, :, None] + torch.arange(height, device=images.device))[:, None, :, None]
    cols = (offsets[1, :, None] + torch.arange(width, device=images.device))[:, None, None, :]
    batch_idx = torch.arange(batch, device=images.device)[:, None, None, None]
    chan_idx = torch.arange(chans, device=images.device)[None, :, None, None]
    return padded[batch_idx, chan_idx, rows, cols]


def random_hflip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(images.shape[0], generator=generator, device=generator.device) < 0.5
    return torch.where(flip.to(images.device)[:, None, None, None], images.flip(-1), images)


def batch_generator(device: torch.device | str, *seed_parts: int) -> torch.Generator:
    """A generator seeded from (epoch seed, batch index, ...): any batch of any epoch can be
    redrawn on its own, which is what lets a run resume mid-epoch bit-identically."""
    seed = 0
    for part in seed_parts:
        seed = (seed * 1_000_003 + int(part) + 1) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(seed)


def train_batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    seed: int,
    crop_padding: int = 0,
    hflip: bool = False,
    start: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled, augmented uint8 batches, from batch `start` on.

    The order comes from `seed`; batch i's crops and flips from (seed, i). The last partial
    batch is dropped so every step has the same shape (what torch.compile and mixup want).
    """
    device = images.device
    order = torch.randperm(len(images), generator=batch_generator(device, seed), device=device)
    usable = len(images) - len(images) % batch_size if len(images) >= batch_size else len(images)
    for index, first in enumerate(range(0, usable, batch_size)):
        if index < start:
            continue
        idx = order[first:first + batch_size]
        generator = batch_generator(device, seed, index)
        batch = random_crop(images[idx], crop_padding, generator)
        if hflip:
            batch = random_hflip(batch, generator)
        yield batch, labels[idx]


def batches_per_epoch(n_images: int, batch_size: int) -> int:
    return max(1, n_images // batch_size)


def eval_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int):
    if batch_size < 1:
        from localitylab.errors import UserError

        raise UserError(f"batch_size must be at least 1, got {batch_size}", setting="batch_size")
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size], labels[start:start + batch_size]

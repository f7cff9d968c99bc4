"""Pixel permutations: one fixed shuffle of the H*W positions, the same for every channel.

The PiT paper's instrument: a model with no built-in locality should not care whether the
pixels arrive in their natural order, as long as every image is shuffled the same way.

Two uses, kept apart by name: at test time the permutation probe moves the pixels of a
model trained on natural images (settings `global`, `local-k`, `swaps-T-d`,
`patch-shuffle-g`: robustness); at train time `permute_pixels=SEED` (a full shuffle,
`global`) or `permute_pixels=SEED, swaps=T[, swap_distance=d]` (the PiT paper's
pixel-swap experiment) trains and tests a model on permuted pixels. Both draw from
`permutation_for_setting`, so a run's permutation is rebuilt exactly from its setting and seed.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np
import torch

from localitylab.errors import UserError


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


# --- shuffles of the pixel grid (pure functions of shape and seed: the record of what was done) ---

def setting_seed(seed: int, setting: str) -> int:
    """The seed of one setting's permutation: stable across runs, machines and Python versions."""
    return zlib.crc32(f"{seed}:{setting}".encode()) & 0x7FFFFFFF


def identity_permutation(height: int, width: int) -> torch.Tensor:
    return torch.arange(height * width)


def global_permutation(height: int, width: int, seed: int) -> torch.Tensor:
    return random_permutation(height * width, seed)


def local_window_permutation(height: int, width: int, window: int, seed: int) -> torch.Tensor:
    """Shuffle pixels inside each window x window tile; no pixel leaves its tile."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    windows_per_row = -(-width // window)
    window_id = ((rows // window) * windows_per_row + cols // window).flatten().double()
    keys = torch.rand(height * width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    # Positions grouped by window in natural order, and the same groups in random order:
    # pairing them sends each position to a random position of its own window.
    natural = torch.argsort(window_id, stable=True)
    shuffled = torch.argsort(window_id + keys * 0.5)
    permutation = torch.empty(height * width, dtype=torch.long)
    permutation[natural] = shuffled
    return permutation


def tile_permutation(height: int, width: int, tile_h: int, tile_w: int, tile_order: torch.Tensor) -> torch.Tensor:
    """Move whole tile_h x tile_w tiles: output tile t shows input tile tile_order[t]."""
    grid_w = width // tile_w
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    tile = (rows // tile_h) * grid_w + cols // tile_w
    source = tile_order[tile]
    source_rows = (source // grid_w) * tile_h + rows % tile_h
    source_cols = (source % grid_w) * tile_w + cols % tile_w
    return (source_rows * width + source_cols).flatten()


def patch_shuffle_permutation(height: int, width: int, grid: int, seed: int) -> torch.Tensor:
    """Cut the image into grid x grid tiles and shuffle them (never the identity order)."""
    if height % grid or width % grid:
        raise UserError(f"patch-shuffle-{grid}: a {height}x{width} image cannot be cut into {grid}x{grid} tiles")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(grid * grid, generator=generator)
    while torch.equal(order, torch.arange(grid * grid)):  # a shuffle that moves nothing measures nothing
        order = torch.randperm(grid * grid, generator=generator)
    return tile_permutation(height, width, height // grid, width // grid, order)


def swap_pairs(height: int, width: int, swaps: int, max_distance: float, seed: int) -> np.ndarray:
    """The T pixel pairs (a, b) of `swap_permutation`, in the order they are swapped: a (T, 2)
    array of flattened positions, a != b, at most `max_distance` pixels apart.

    How they are drawn (numpy's default_rng(seed)): with d = inf, a uniform over the H*W
    pixels and b uniform over the other H*W - 1 (T draws of each, vectorised). With a finite
    d, a uniform over the pixels and an offset uniform over the integer offsets (dy, dx) != 0
    with dy^2 + dx^2 <= d^2; pairs whose partner falls outside the image are dropped and more
    are drawn (rejection sampling), so b is uniform over the other pixels within d of a, and
    the first T pairs kept are the swaps."""
    num_pixels = height * width
    if swaps <= 0 or num_pixels < 2:
        return np.zeros((0, 2), dtype=np.int64)
    rng = np.random.default_rng(seed)
    if math.isinf(max_distance):
        first = rng.integers(0, num_pixels, swaps)
        second = (first + rng.integers(1, num_pixels, swaps)) % num_pixels  # any other pixel, uniformly
        return np.stack([first, second], axis=1)
    reach = int(math.floor(max_distance))
    dy, dx = np.meshgrid(np.arange(-reach, reach + 1), np.arange(-reach, reach + 1), indexing="ij")
    keep = (dy**2 + dx**2 <= max_distance**2) & ((dy != 0) | (dx != 0))
    offsets = np.stack([dy[keep], dx[keep]], axis=1)
    if len(offsets) == 0:
        raise UserError(f"swap distance {max_distance} reaches no other pixel; valid: >= 1 or inf")
    first_parts, second_parts, found = [], [], 0
    while found < swaps:  # rejection sampling: keep pairs whose partner is inside the image
        draw = max(2 * (swaps - found), 64)
        a = rng.integers(0, num_pixels, draw)
        offset = offsets[rng.integers(0, len(offsets), draw)]
        row, col = a // width + offset[:, 0], a % width + offset[:, 1]
        inside = (row >= 0) & (row < height) & (col >= 0) & (col < width)
        first_parts.append(a[inside])
        second_parts.append((row * width + col)[inside])
        found += int(inside.sum())
    return np.stack([np.concatenate(first_parts)[:swaps], np.concatenate(second_parts)[:swaps]], axis=1)


def swap_permutation(height: int, width: int, swaps: int, max_distance: float, seed: int) -> torch.Tensor:
    """T random transpositions of pixel pairs at most `max_distance` pixels apart
    (`swap_pairs`), applied one after the other to the pixel grid: swap t exchanges the
    contents of positions a_t and b_t. A pixel moves at most `max_distance` per swap it takes
    part in, so no pixel ends farther than min(T * d, the image diagonal) from where it was.

    Used twice, under two names: the permutation probe's test-time `swaps-T-d` setting
    (robustness of a model trained on natural pixels), and training with `permute_pixels=SEED,
    swaps=T, swap_distance=d`, the PiT paper's experiment (train and test on swapped
    pixels), where this function with seed SEED draws the run's one fixed permutation."""
    permutation = np.arange(height * width)
    for a, b in swap_pairs(height, width, swaps, max_distance, seed).tolist():  # order matters: swaps compose
        permutation[a], permutation[b] = permutation[b], permutation[a]
    return torch.from_numpy(permutation)


def permutation_for_setting(setting: str, height: int, width: int, seed: int) -> torch.Tensor:
    """The exact permutation behind a table row: `setting` as written in the table, `seed`
    as in its note (`seed=N`)."""
    family, _, arg = setting.partition("-")
    if setting == "clean":
        return identity_permutation(height, width)
    if setting == "global":
        return global_permutation(height, width, seed)
    if family == "local" and arg.isdigit():
        return local_window_permutation(height, width, int(arg), seed)
    if setting.startswith("patch-shuffle-") and setting.rsplit("-", 1)[1].isdigit():
        return patch_shuffle_permutation(height, width, int(setting.rsplit("-", 1)[1]), seed)
    if family == "swaps":
        count, _, distance = arg.partition("-")
        if count.isdigit() and distance:
            return swap_permutation(height, width, int(count), parse_distance(distance), seed)
    raise UserError(f"unknown permutation setting {setting!r}; valid: clean, global, local-K, swaps-T-D, patch-shuffle-G")


def mean_displacement(permutation: torch.Tensor, height: int, width: int) -> float:
    """Mean distance in pixels between where a pixel was and where it lands: the shuffle's strength."""
    target = torch.arange(height * width)
    dy = (target // width - permutation // width).double()
    dx = (target % width - permutation % width).double()
    return float(torch.sqrt(dy**2 + dx**2).mean())


def parse_distance(text: Any) -> float:
    if isinstance(text, str) and text.strip().lower() == "inf":
        return math.inf
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise UserError(f"swap distance {text!r} is not a number; valid: a number >= 1 or 'inf'") from None
    if not value >= 1:
        raise UserError(f"swap distance {text!r} reaches no other pixel; valid: a number >= 1 or 'inf'")
    return value


def distance_label(distance: float) -> str:
    return "inf" if math.isinf(distance) else f"{distance:g}"

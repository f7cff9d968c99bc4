"""Where tokens sit on the input image, in pixels: the geometry every attention probe measures in.

A model with a token grid of (rows, cols) over an image places token (i, j) at the centre
of its pixels, ((i + 0.5) * p, (j + 0.5) * p) with p pixels per token (docs/probes.md,
Geometry). Prefix tokens ([cls], registers) have no position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TokenGeometry:
    """A grid (rows, cols) of tokens `patch_size` pixels apart, after `num_prefix_tokens` prefix tokens."""

    grid: tuple[int, int]
    patch_size: int
    num_prefix_tokens: int

    @property
    def num_grid_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_grid_tokens + self.num_prefix_tokens

    @property
    def image_shape(self) -> tuple[int, int]:
        return self.grid[0] * self.patch_size, self.grid[1] * self.patch_size

    @property
    def image_side(self) -> int:
        return max(self.image_shape)

    def centres(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(T, 2) pixel centres ((i + 0.5) p, (j + 0.5) p) of the grid tokens, row-major."""
        rows, cols = torch.meshgrid(torch.arange(self.grid[0], dtype=torch.float64),
                                    torch.arange(self.grid[1], dtype=torch.float64), indexing="ij")
        centres = (torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1) + 0.5) * self.patch_size
        return centres.to(device=device, dtype=dtype)

    def uniform_distance_px(self) -> float:
        """Mean distance between two tokens drawn uniformly (self pairs included).

        Counted by offset, (G_h - |di|)(G_w - |dj|) pairs per offset, so it costs O(grid)
        rather than O(T^2): the 224 x 224 PiT grid has 2.5e9 pairs.
        """
        rows, cols = self.grid
        di = np.arange(-(rows - 1), rows)
        dj = np.arange(-(cols - 1), cols)
        counts = np.outer(rows - np.abs(di), cols - np.abs(dj)).astype(np.float64)
        lengths = np.hypot(di[:, None], dj[None, :]) * self.patch_size
        return float((counts * lengths).sum() / self.num_grid_tokens**2)

    def token_of_pixel(self, row: int, col: int) -> int:
        """Index, prefix included, of the token whose patch contains pixel (row, col)."""
        return self.num_prefix_tokens + (row // self.patch_size) * self.grid[1] + col // self.patch_size


def pixel_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) Euclidean distances between pixel centres, from exact coordinate
    differences (multiples of half a patch) and one rounding in the square root, where
    |a|^2 + |b|^2 - 2ab would lose small distances in fp32."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")

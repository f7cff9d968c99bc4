"""Position-embedding tables that timm does not build into VisionTransformer.

timm's ViT offers a learned table or none; the PiT paper's ablation also needs the fixed
2-D sin-cos table of MAE / "An Image is Worth 16x16 Words" appendix D.4.
"""

from __future__ import annotations

import torch


def sincos_2d(embed_dim: int, grid_h: int, grid_w: int, temperature: float = 10000.0) -> torch.Tensor:
    """The (grid_h*grid_w, embed_dim) 2-D sin-cos table, rows in row-major grid order.

    Half of the channels encode the row, half the column; each half is [sin | cos] of the
    coordinate times geometrically spaced frequencies (as in MAE's get_2d_sincos_pos_embed).
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )

    def encode(coord: torch.Tensor) -> torch.Tensor:
        angles = coord.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()

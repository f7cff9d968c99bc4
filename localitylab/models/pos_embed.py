"""Position-embedding tables that timm does not build into VisionTransformer.

timm's ViT offers a learned table or none; the PiT paper's ablation also needs the fixed
2-D sin-cos table of MAE / "An Image is Worth 16x16 Words" appendix D.4.
"""

from __future__ import annotations

from typing import Any

import torch

from localitylab.errors import UserError

# A learned position embedding starts at timm's std 0.02 (DeiT's, the PiT paper's), so that
# training can move it: AdamW moves each entry by at most about the learning rate per step,
# whatever its size, and in a few hundred steps that is a few hundredths. From 1.0 (this
# module's default until issue 15) the table moved 3-8% of its norm in every run of
# docs/defaults.md and its PE scores stayed in the untrained range, so the pe-similarity
# probe described the initialisation, not what was learned; from 0.02 it moved 95-670%,
# carried position (linear R2 0.09-0.33 on shapes-16/32 against at most -0.03 untrained),
# and vit-n/2 on shapes-16 and vit-n/4 on shapes-32 were 16 and 12 points more accurate.
# The exception is 8x8 digits with a 15-epoch recipe, where a large random table serves as a
# fixed position code and trains much faster (pit-n 93% against 28-32%): digits' recipe
# starts tables at 1.0 (localitylab.data.digits). pos_embed_std X (or model_kw
# pos_embed_std=X) sets it per run.
POS_EMBED_STD = 0.02


def token_options(spec: Any, patch_size: int, default_pos_embed: str) -> tuple[str, float, dict[str, Any]]:
    """(position embedding, its initial std, the other model_kw) of a patch-token model
    (`spec` a ModelSpec), with a one-line UserError for a patch size that does not divide the
    image, an unknown position embedding or a std that is not a number."""
    from localitylab.models.spec import POS_EMBEDS

    if spec.img_size % patch_size:
        raise UserError(
            f"image size {spec.img_size} is not divisible by patch size {patch_size}; "
            f"valid patch sizes: {', '.join(str(p) for p in range(1, spec.img_size + 1) if spec.img_size % p == 0)}"
        )
    pos_embed = spec.pos_embed or default_pos_embed
    if pos_embed not in POS_EMBEDS:
        raise UserError(f"unknown position embedding {pos_embed!r}; valid: {', '.join(POS_EMBEDS)}")
    extra = dict(spec.model_kw)
    raw_std = extra.pop("pos_embed_std", POS_EMBED_STD)
    try:
        pos_embed_std = float(raw_std)
    except (TypeError, ValueError):
        raise UserError(f"{spec.name}: pos_embed_std must be a number, got {raw_std!r}") from None
    return pos_embed, pos_embed_std, extra


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

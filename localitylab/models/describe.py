"""A uniform description of any model: parameters, tokens, patch size, position embedding.

Probes and reports use this instead of poking at model internals, so they work the same on
our PiTs and ViTs, ConvNets and arbitrary timm models.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch.nn as nn

if TYPE_CHECKING:
    from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class ModelInfo:
    params: int
    trainable_params: int
    is_transformer: bool
    patch_size: int | None  # None for ConvNets
    grid: tuple[int, int] | None  # token grid (rows, cols); None for ConvNets
    num_prefix_tokens: int  # [cls], registers
    pos_embed: str  # 'learn', 'sincos' (frozen), 'none', or 'n/a'

    @property
    def tokens_per_image(self) -> int | None:
        if self.grid is None:
            return None
        return self.grid[0] * self.grid[1] + self.num_prefix_tokens


def describe_model(model: nn.Module) -> ModelInfo:
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if hasattr(model, "pos_embed_kind"):  # a model that describes its own tokens (the DiT)
        return ModelInfo(params, trainable, True, int(model.patch_size), tuple(model.grid_size),
                         int(model.num_prefix_tokens), model.pos_embed_kind)
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or not hasattr(model, "blocks"):
        return ModelInfo(params, trainable, False, None, None, 0, "n/a")
    patch = patch_embed.patch_size
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    grid = tuple(int(g) for g in patch_embed.grid_size)
    pos_kind = position_embedding_kind(model, grid)
    return ModelInfo(params, trainable, True, int(patch), grid, int(getattr(model, "num_prefix_tokens", 0)), pos_kind)


def position_embedding_kind(model: nn.Module, grid: tuple[int, int]) -> str:
    """'none', 'learn', 'sincos' (the fixed 2-D table, frozen) or 'frozen' (a learned table
    that is not trained in this run, e.g. under --linear-probe): frozen alone is not sin-cos."""
    import torch

    from localitylab.models.pos_embed import sincos_2d

    pos = getattr(model, "pos_embed", None)
    if not isinstance(pos, torch.Tensor):
        return "none"
    if pos.requires_grad:
        return "learn"
    rows = grid[0] * grid[1]
    if pos.is_meta or pos.dim() != 3 or pos.shape[1] < rows:
        return "frozen"  # no values to compare (a model built on the meta device)
    table = pos.detach()[0, -rows:].float().cpu()
    if table.shape[-1] % 4 == 0:
        if torch.allclose(table, sincos_2d(table.shape[-1], *grid), atol=1e-6):
            return "sincos"
    return "frozen"


@contextlib.contextmanager
def flop_counter() -> Iterator["FlopCounterMode"]:
    """torch.utils.flop_counter (a multiply-add is 2) with attention run through SDPA's math
    backend: its Q K^T and A V are plain batched matmuls, which every torch version counts
    on every device. (The fused CPU kernel has no FLOP formula in some versions and would
    count as zero; flash attention's backward would add its recomputation.) So the count is
    the model's own FLOPs: backward twice the forward, as MFU is usually defined.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        yield counter


def count_flops(model: nn.Module, in_chans: int, img_size: int) -> int:
    """Forward FLOPs for one image (matmuls, convolutions, attention; a multiply-add is 2)."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    images = torch.zeros(1, in_chans, img_size, img_size, device=device)
    # A model that takes more than images (a denoiser: noise level and label) says what.
    inputs = model.example_inputs(images) if hasattr(model, "example_inputs") else (images,)
    with torch.no_grad(), flop_counter() as counter:
        model(*inputs)
    model.train(was_training)
    return int(counter.get_total_flops())


def model_summary(model: nn.Module, in_chans: int, img_size: int) -> dict:
    """What reports show about a model, recorded at training time (reports never run models)."""
    info = describe_model(model)
    return {"params": info.params, "trainable_params": info.trainable_params, "patch_size": info.patch_size,
            "tokens_per_image": info.tokens_per_image, "pos_embed": info.pos_embed,
            "flops_per_image": count_flops(model, in_chans, img_size)}

"""A uniform description of any model: parameters, tokens, patch size, position embedding.

Probes and reports use this instead of poking at model internals, so they work the same on
our PiTs and ViTs, ConvNets and arbitrary timm models.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class ModelDescription:
    """What `describe_model` finds: the same fields for a PiT, a ViT, a ConvNet or any timm model."""

    params: int
    trainable_params: int
    is_transformer: bool
    # Pixels of the input image per token side: the true token spacing, image side / grid side
    # (for a hybrid ViT whose patches are cut from a backbone's feature map, the backbone's
    # stride times the patch). The one place token spacing is decided (docs/probes.md, Geometry).
    patch_size: int | float | None  # None for ConvNets and for tokens not on one grid
    grid: tuple[int, int] | None  # token grid (rows, cols) the model's embedding makes; None as above
    num_prefix_tokens: int  # [cls], distillation token, registers
    pos_embed: str  # 'learn', 'sincos' (frozen), 'none', or 'n/a'
    layout_note: str = ""  # why tokens could not be placed on one grid ('' when they are, or for a ConvNet)
    # The grid follows the image the model is given (NaFlexViT: image side / patch_size tokens a side)
    grid_from_image: bool = False

    def grid_for(self, image_shape: tuple[int, int]) -> tuple[int, int] | None:
        """The token grid for an image of `image_shape` pixels."""
        if self.grid is not None:
            return self.grid
        if self.grid_from_image and self.patch_size:
            return int(image_shape[0] // self.patch_size), int(image_shape[1] // self.patch_size)
        return None

    @property
    def tokens_per_image(self) -> int | None:
        if self.grid is None:
            return None
        return self.grid[0] * self.grid[1] + self.num_prefix_tokens


def describe_model(model: nn.Module) -> ModelDescription:
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if hasattr(model, "pos_embed_kind"):  # a model that describes its own tokens (the DiT)
        return ModelDescription(params, trainable, True, int(model.patch_size), tuple(model.grid_size),
                         int(model.num_prefix_tokens), model.pos_embed_kind)
    encoder = getattr(model, "encoder", None)
    if getattr(model, "patch_embed", None) is None and isinstance(encoder, nn.Module) \
            and getattr(encoder, "patch_embed", None) is not None and hasattr(encoder, "blocks"):
        # a classifier around an encoder (timm's DeepSeek, Qwen3 and Gemma 4 ViTs)
        return dataclasses.replace(describe_model(encoder), params=params, trainable_params=trainable)
    patch_embed = getattr(model, "patch_embed", None)
    embeds = getattr(model, "embeds", None)
    if patch_embed is None and embeds is not None and hasattr(model, "blocks") and getattr(embeds, "patch_size", None):
        # NaFlexViT: patches of a fixed size from an image of any size, so the grid is the image's
        patch = _pair(embeds.patch_size)
        if patch[0] == patch[1]:
            prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
            return ModelDescription(params, trainable, True, patch[0], None, prefix, position_embedding_kind(model, None),
                             f"{type(embeds).__name__}: {patch[0]} px patches, the grid follows the image",
                             grid_from_image=True)
    if patch_embed is None or not hasattr(model, "blocks"):
        note = "" if patch_embed is None else f"{type(model).__name__} has no `blocks`: its tokens change grid by stage"
        return ModelDescription(params, trainable, patch_embed is not None, None, None, 0,
                         position_embedding_kind(model, None) if patch_embed is not None else "n/a", note)
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    grid, spacing, note = token_layout(patch_embed)
    patch = _pair(getattr(patch_embed, "patch_size", None))
    if grid is None and getattr(patch_embed, "img_size", None) is None and patch is not None and patch[0] == patch[1]:
        return ModelDescription(params, trainable, True, patch[0], None, prefix, position_embedding_kind(model, None),
                         f"{type(patch_embed).__name__}: {patch[0]} px patches, the grid follows the image",
                         grid_from_image=True)  # e.g. Gemma 4's patch embedding: any image size
    return ModelDescription(params, trainable, True, spacing, grid, prefix, position_embedding_kind(model, grid), note)


def token_layout(patch_embed: nn.Module) -> tuple[tuple[int, int] | None, int | float | None, str]:
    """(grid, pixels per token side, note) of the tokens an embedding makes from one image.

    The spacing is the tokens' stride on the image, the image side over the grid side where
    the patches fill the image: for timm's HybridEmbed, which cuts patches from a backbone's
    feature map, the backbone's stride (timm's `feature_ratio`) times the patch, not the
    patch; for a patch embedding, the patch (SigLIP's 14 px patches of a 384 px image make
    27 tokens a side, 14 px apart, and leave the last 6 pixels out). An embedding that makes
    several grids (CrossViT) or none timm describes gets a note instead."""
    name = type(patch_embed).__name__
    if isinstance(patch_embed, (nn.ModuleList, nn.ModuleDict)):
        return None, None, f"{len(patch_embed)} patch embeddings ({name}): tokens on several grids"
    img_size = _pair(getattr(patch_embed, "img_size", None))
    grid = _pair(getattr(patch_embed, "grid_size", None))
    patch = _pair(getattr(patch_embed, "patch_size", None))
    if grid is None and img_size is not None and patch is not None:
        grid = (img_size[0] // patch[0], img_size[1] // patch[1])  # e.g. XCiT's ConvPatchEmbed
    if grid is None or img_size is None or min(grid) < 1:
        return None, None, f"{name} says no image size and token grid"
    ratio = _pair(getattr(patch_embed, "feature_ratio", None))
    if ratio is not None and patch is not None:  # HybridEmbed: the backbone's stride times the patch
        spacing = [float(ratio[axis] * patch[axis]) for axis in (0, 1)]
    elif patch is not None:  # the patch is the stride: an image side the patches do not fill loses its last pixels
        spacing = [float(patch[axis]) for axis in (0, 1)]
    else:
        spacing = [img_size[axis] / grid[axis] for axis in (0, 1)]
    if spacing[0] != spacing[1]:
        return None, None, f"{name} spaces tokens {spacing[0]:g} px apart in rows and {spacing[1]:g} in columns"
    return grid, int(spacing[0]) if spacing[0].is_integer() else spacing[0], ""


def _pair(value) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value, value
    try:
        values = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        return None
    return values if len(values) == 2 else None


def position_embedding_kind(model: nn.Module, grid: tuple[int, int] | None) -> str:
    """'none', 'learn', 'sincos' (the fixed 2-D table, frozen) or 'frozen' (a learned table
    that is not trained in this run, e.g. under linear_probe): frozen alone is not sin-cos.
    A table that is not a tensor (a relative or rotary module) is 'none': no absolute table."""
    import torch

    from localitylab.models.pos_embed import sincos_2d

    pos = getattr(model, "pos_embed", None)
    if not isinstance(pos, torch.Tensor):
        return "none"
    if pos.requires_grad:
        return "learn"
    if grid is None:
        return "frozen"  # no grid to compare a sin-cos table on
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
    described = describe_model(model)
    return {"params": described.params, "trainable_params": described.trainable_params,
            "patch_size": described.patch_size, "tokens_per_image": described.tokens_per_image,
            "pos_embed": described.pos_embed,
            "flops_per_image": count_flops(model, in_chans, img_size)}

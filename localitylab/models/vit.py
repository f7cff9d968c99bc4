"""Pixel Transformers (PiT) and ViTs, built through timm's VisionTransformer.

A PiT is a ViT with patch size 1: every pixel is a token, with a [cls] token and a
learned position embedding (Nguyen et al. 2024, arXiv 2406.09415). Building both through
`timm.create_model('vit_...', patch_size=P, ...)` means every timm tool (feature
extraction, attention extraction, optimizers) works on them unchanged.

Not to be confused with timm's own `pit_*` models: those are Pooling-based Vision
Transformers (Heo et al. 2021), a different architecture.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from localitylab.errors import UserError
from localitylab.models.pos_embed import sincos_2d, token_options
from localitylab.models.registry import register_model
from localitylab.models.spec import ModelSpec

# Widths from the PiT paper (t/s/b follow DeiT); n (nano) is ours, sized so an epoch on
# digits takes a second or two on 2 CPU cores.
WIDTHS = {
    "n": dict(embed_dim=64, depth=4, num_heads=4),
    "t": dict(embed_dim=192, depth=12, num_heads=3),
    "s": dict(embed_dim=384, depth=12, num_heads=6),
    "b": dict(embed_dim=768, depth=12, num_heads=12),
}

# The timm entry point each width is built from (its dimensions are overridden anyway).
_TIMM_BASE = {"n": "vit_tiny_patch16_224", "t": "vit_tiny_patch16_224", "s": "vit_small_patch16_224", "b": "vit_base_patch16_224"}


def build_vision_transformer(spec: ModelSpec, size: str, patch_size: int) -> nn.Module:
    import timm

    pos_embed, pos_embed_std, extra = token_options(spec, patch_size, default_pos_embed="learn")
    kwargs = dict(WIDTHS[size])
    kwargs.update(
        patch_size=patch_size,
        img_size=spec.img_size,
        in_chans=spec.in_chans,
        num_classes=spec.num_classes,
        class_token=True,
        global_pool="token",
        pos_embed="none" if pos_embed == "none" else "learn",
    )
    kwargs.update(extra)
    try:
        model = timm.create_model(_TIMM_BASE[size], pretrained=False, **kwargs)
    except TypeError as err:  # an unknown model_kw key
        raise UserError(f"{spec.name}: {err}") from None
    except (ValueError, RuntimeError, AssertionError) as err:  # a model_kw value timm cannot build (depth=-1)
        raise UserError(f"{spec.name} cannot be built with {extra}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if pos_embed == "learn":
        with torch.no_grad():
            nn.init.trunc_normal_(model.pos_embed, std=pos_embed_std, a=-2 * pos_embed_std, b=2 * pos_embed_std)
    elif pos_embed == "sincos":
        freeze_sincos(model)
    return model


def freeze_sincos(model: nn.Module) -> None:
    """Replace the learned table by the fixed 2-D sin-cos table and stop training it."""
    grid_h, grid_w = model.patch_embed.grid_size
    table = sincos_2d(model.embed_dim, grid_h, grid_w)
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    full = model.pos_embed.data.new_zeros(model.pos_embed.shape)
    full[0, prefix:] = table  # prefix tokens get a zero row, as in MAE
    model.pos_embed.data.copy_(full)
    model.pos_embed.requires_grad_(False)


def _register(size: str) -> None:
    dims = WIDTHS[size]
    desc = f"width {dims['embed_dim']}, {dims['depth']} blocks, {dims['num_heads']} heads"

    @register_model(f"pit-{size}", kind="pit", summary=f"Pixel Transformer, one token per pixel; {desc}",
                    pos_embed="learn")
    def _pit(spec: ModelSpec) -> nn.Module:
        return build_vision_transformer(spec, size, 1)

    @register_model(
        f"vit-{size}", kind="vit", summary=f"ViT with PxP patches; {desc}", takes_patch=True, example_patch=2,
        pos_embed="learn",
    )
    def _vit(spec: ModelSpec) -> nn.Module:
        return build_vision_transformer(spec, size, spec.patch)


for _size in WIDTHS:
    _register(_size)

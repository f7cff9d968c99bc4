"""Adapters for timm's ViTs whose tokens change grid by stage or nest in blocks.

Each reads its module's attention where it reaches `F.scaled_dot_product_attention` (the
module's `fused_attn` path, or its own computation with the softmax handed to SDPA), and places
the call's rows and keys on the image the way the module arranges its tokens:

- PiT (timm's `pit_*`, pooling-based ViTs): timm's plain `Attention` over the class
  token(s) and one stage's grid, which pooling halves from stage to stage;
- LeViT: attention with learned biases on its stage grid (`resolution`), and its
  down-sampling attention, whose queries are every `stride`-th token of that grid;
- VOLO: the self-attention stages after its outlook attention, on their (H, W) grid;
- TNT: the outer attention over the class token and the patches, and the inner attention
  among the sub-patch tokens of each patch (windows of the fine grid);
- NesT: attention inside each block of the nested grid (windows);
- HieraDet (SAM 2's image encoder): windowed or global attention at the block, as SAM's;
- Swin v2 "cr": scaled cosine attention in (shifted) windows, as timm's Swin v2.

Blocks that pool their queries (HieraDet at a stage change) are not read; the probes name them.
Each adapter is checked against the attention materialised independently in the tests.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from localitylab.attention.adapters import (WHY_UNREAD, AttentionAdapter, CallGeometry, SdpaCall,
                                            TimmAttention, fused_attn, register_adapter)
from localitylab.attention.families import (HandMadeAttention, SwinBlockAttention, WindowBlockAttention,
                                            _timm_class, copied, forward_replaced, recording_input, stage_geometry,
                                            window_geometry, with_shift_mask)
from localitylab.attention.geometry import TokenGeometry


WHY_UNREAD.update({
    "MultiScaleAttention": "pooled attention (MViTv2; HieraDet at a stage change): queries or keys pooled on the "
                           "grid, which no adapter places yet",
    "MaskUnitAttention": "Hiera's mask-unit attention: tokens in its unrolled mask-unit order, which no adapter "
                         "places yet",
    "DiffAttention": "differential attention: the difference of two softmax maps, not one distribution over keys",
    "DiffParallelScalingBlock": "differential attention (in a parallel block): the difference of two softmax maps, "
                                "not one distribution over keys",
})


# --- ViT-22B-style parallel blocks: attention and MLP side by side in one block ----------------------------
_ParallelBlock = _timm_class("timm.models.vision_transformer", "ParallelScalingBlock")


@register_adapter
class ParallelBlockAttention(AttentionAdapter):
    """timm's ParallelScalingBlock (ViT-22B's parallel layout): the block computes its own
    attention over the model's tokens (qk-norm, `fused_attn` path to SDPA) beside its MLP."""

    name = "parallel-block"
    module_type = _ParallelBlock
    requires = (_ParallelBlock,)

    def reading(self):
        return fused_attn(self.module)


def stage_self_attention(call: SdpaCall, height: int, width: int, prefix: int, geometry: TokenGeometry,
                         note: str = "") -> CallGeometry:
    """A self-attention over `prefix` tokens then a (height x width) stage grid placed on the image."""
    stage = stage_geometry(height, width, geometry)
    if call.num_keys != prefix + stage.num_grid_tokens:
        raise RuntimeError(f"{call.num_keys} keys for {prefix} prefix tokens and a {height}x{width} grid")
    device = call.q.device
    centres = stage.centres(device, torch.float64)
    queries = torch.cat([torch.full((prefix, 2), float("nan"), dtype=torch.float64, device=device), centres])
    return CallGeometry(torch.full((call.num_queries,), -1, device=device), queries, centres, prefix,
                        torch.arange(call.q.shape[0], device=device), grid=stage, note=note)


# --- PiT: timm's Attention over the class token(s) and one stage's grid ---------------------------------
_Pit = _timm_class("timm.models.pit", "PoolingVisionTransformer")
@register_adapter
class PitStageAttention(AttentionAdapter):
    """PiT: each stage's blocks attend over the class token(s) (two with distillation) and
    the stage grid, which the pooling between stages halves. The grid's shape is the
    image's shape with as many cells as the call has non-prefix keys."""

    name = "pit-stages"
    module_type = TimmAttention.module_type
    requires = (_Pit,)
    precedence = 1  # timm's plain Attention, but inside PiT: asked before timm-attention
    needs_model_grid = False

    def __init__(self, module: nn.Module, prefix: int = 1) -> None:
        super().__init__(module)
        self.prefix = prefix

    @classmethod
    def reads_in(cls, module: nn.Module, model: nn.Module, name: str) -> bool:
        parts = name.split(".")  # transformers.<stage>.blocks.<j>.attn
        return (isinstance(model, _Pit) and cls.reads(module) and len(parts) == 5
                and parts[0] == "transformers" and parts[2] == "blocks" and parts[4] == "attn")

    @classmethod
    def bound(cls, module: nn.Module, model: nn.Module, name: str) -> "PitStageAttention":
        return cls(module, int(model.cls_token.shape[1]))

    def reading(self):
        return fused_attn(self.module)

    def geometry_key(self, call: SdpaCall) -> tuple:
        return type(self).__name__, self.prefix, tuple(call.q.shape), str(call.q.device)

    def call_geometry(self, call: SdpaCall, geometry: TokenGeometry) -> CallGeometry:
        tokens = call.num_keys - self.prefix
        image_h, image_w = geometry.image_shape
        height = round(math.sqrt(tokens * image_h / image_w))
        width = tokens // max(height, 1)
        if height * width != tokens:
            raise RuntimeError(f"PiT stage: {tokens} tokens make no grid of the image's shape {image_h}x{image_w}")
        return stage_self_attention(call, height, width, self.prefix, geometry, f"stage grid {height}x{width}")


# --- LeViT: attention biases on the stage grid; down-sampling attention -----------------------------------
def _levit_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm's LeViT Attention.forward (both layouts) with its softmax handed to SDPA: the
    learned attention biases are the call's additive mask."""
    bias = self.get_attention_biases(x.device)
    if self.use_conv:
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).view(B, self.num_heads, -1, H * W).split([self.key_dim, self.key_dim, self.val_dim], dim=2)
        out = F.scaled_dot_product_attention(q.transpose(-2, -1), k.transpose(-2, -1), v.transpose(-2, -1),
                                             attn_mask=bias, scale=self.scale)
        x = out.transpose(-2, -1).reshape(B, -1, H, W)
    else:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        out = F.scaled_dot_product_attention(q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3),
                                             attn_mask=bias, scale=self.scale)
        x = out.transpose(1, 2).reshape(B, N, self.val_attn_dim)
    return self.proj(x)


def _levit_downsample_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm's LeViT AttentionDownsample.forward (both layouts) with its softmax handed to SDPA."""
    bias = self.get_attention_biases(x.device)
    if self.use_conv:
        B, C, H, W = x.shape
        HH, WW = (H - 1) // self.stride + 1, (W - 1) // self.stride + 1
        k, v = self.kv(x).view(B, self.num_heads, -1, H * W).split([self.key_dim, self.val_dim], dim=2)
        q = self.q(x).view(B, self.num_heads, self.key_dim, -1)
        out = F.scaled_dot_product_attention(q.transpose(-2, -1), k.transpose(-2, -1), v.transpose(-2, -1),
                                             attn_mask=bias, scale=self.scale)
        x = out.transpose(-2, -1).reshape(B, self.val_attn_dim, HH, WW)
    else:
        B, N, C = x.shape
        k, v = self.kv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.val_dim], dim=3)
        q = self.q(x).view(B, -1, self.num_heads, self.key_dim).permute(0, 2, 1, 3)
        out = F.scaled_dot_product_attention(q, k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3), attn_mask=bias,
                                             scale=self.scale)
        x = out.transpose(1, 2).reshape(B, -1, self.val_attn_dim)
    return self.proj(x)


_LevitAttention = _timm_class("timm.models.levit", "Attention")
_LevitDownsample = _timm_class("timm.models.levit", "AttentionDownsample")


@register_adapter
class LevitAttention(HandMadeAttention):
    """LeViT: softmax(q k^T scale + learned biases) over its stage grid (`resolution`)."""

    name = "levit-attention"
    module_type = _LevitAttention
    requires = (_LevitAttention,)
    replacement = staticmethod(_levit_forward)
    copies = copied(_LevitAttention, "08c32a19d54aebac")
    needs_model_grid = False

    def geometry_key(self, call: SdpaCall) -> tuple:
        return type(self).__name__, tuple(self.module.resolution), tuple(call.q.shape), str(call.q.device)

    def call_geometry(self, call: SdpaCall, geometry: TokenGeometry) -> CallGeometry:
        height, width = self.module.resolution
        return stage_self_attention(call, height, width, 0, geometry, f"stage grid {height}x{width}")


@register_adapter
class LevitDownsampleAttention(HandMadeAttention):
    """LeViT's down-sampling attention: keys on the stage grid, queries its tokens at every
    `stride`-th row and column (sub-sampled, or average-pooled around them)."""

    name = "levit-downsample"
    module_type = _LevitDownsample
    requires = (_LevitDownsample,)
    replacement = staticmethod(_levit_downsample_forward)
    copies = copied(_LevitDownsample, "13c69487c9fba382")
    needs_model_grid = False

    def geometry_key(self, call: SdpaCall) -> tuple:
        return (type(self).__name__, tuple(self.module.resolution), int(self.module.stride), tuple(call.q.shape),
                str(call.q.device))

    def call_geometry(self, call: SdpaCall, geometry: TokenGeometry) -> CallGeometry:
        height, width = self.module.resolution
        stride = int(self.module.stride)
        stage = stage_geometry(height, width, geometry)
        device = call.q.device
        keys = stage.centres(device, torch.float64)
        rows = torch.arange(0, height, stride, dtype=torch.float64)
        cols = torch.arange(0, width, stride, dtype=torch.float64)
        queries = (torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2) + 0.5).to(device)
        queries = queries * float(stage.patch_size)
        if len(queries) != call.num_queries or len(keys) != call.num_keys:
            raise RuntimeError(f"LeViT down-sampling: {len(queries)} x {len(keys)} placed for a "
                               f"{call.num_queries} x {call.num_keys} call")
        return CallGeometry(torch.full((call.num_queries,), -1, device=device), queries, keys, 0,
                            torch.arange(call.q.shape[0], device=device), grid=stage,
                            note=f"queries every {stride} tokens of the {height}x{width} grid")


# --- VOLO: self-attention on the (H, W) grid of its later stages --------------------------------------------
_VoloAttention = _timm_class("timm.models.volo", "Attention")


@register_adapter
class VoloAttention(AttentionAdapter):
    """VOLO's self-attention blocks (after its outlook-attention stage): (B, H, W, C) tokens,
    no prefix (the class tokens join only for the class attention at the end)."""

    name = "volo-attention"
    module_type = _VoloAttention
    requires = (_VoloAttention,)
    needs_model_grid = False

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.resolution: tuple[int, int] | None = None

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        def record(args: tuple) -> None:
            self.resolution = (int(args[0].shape[1]), int(args[0].shape[2]))

        with fused_attn(self.module), recording_input(self.module, record):
            yield

    def geometry_key(self, call: SdpaCall) -> tuple:
        return type(self).__name__, self.resolution, tuple(call.q.shape), str(call.q.device)

    def call_geometry(self, call: SdpaCall, geometry: TokenGeometry) -> CallGeometry:
        height, width = self.resolution
        return stage_self_attention(call, height, width, 0, geometry, f"stage grid {height}x{width}")


# --- TNT: outer attention over the patches, inner attention within each patch --------------------------------
def _tnt_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm's TNT Attention.forward through SDPA (softmax(q k^T scale) @ v is what it computes)."""
    B, N, C = x.shape
    q, k = self.qk(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    v = self.v(x).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
    x = F.scaled_dot_product_attention(q, k, v, scale=self.scale).transpose(1, 2).reshape(B, N, -1)
    return self.proj_drop(self.proj(x))


_Tnt = _timm_class("timm.models.tnt", "TNT")
_TntAttention = _timm_class("timm.models.tnt", "Attention")


@register_adapter
class TntAttention(HandMadeAttention):
    """TNT: each block's outer attention runs over the class token and the patch grid; its
    inner attention over the sub-patch tokens of each patch (the pixel embedding's fine
    grid, `new_patch_size` tokens a side per patch): windows of that grid, one per patch."""

    name = "tnt-attention"
    module_type = _TntAttention
    requires = (_Tnt, _TntAttention)
    replacement = staticmethod(_tnt_forward)
    copies = copied(_TntAttention, "50f308d40c6dc242")
    needs_model_grid = False

    def __init__(self, module: nn.Module, inner: bool = False, grid: tuple[int, int] = (0, 0),
                 window: tuple[int, int] = (0, 0), prefix: int = 1) -> None:
        super().__init__(module)
        self.inner, self.grid, self.window, self.prefix = inner, grid, window, prefix

    @classmethod
    def reads_in(cls, module: nn.Module, model: nn.Module, name: str) -> bool:
        return isinstance(model, _Tnt) and cls.reads(module) and name.split(".")[-1] in ("attn_in", "attn_out")

    @classmethod
    def bound(cls, module: nn.Module, model: nn.Module, name: str) -> "TntAttention":
        embed = model.pixel_embed
        grid = tuple(int(embed.img_size[axis] // embed.patch_size[axis]) for axis in (0, 1))
        window = tuple(int(size) for size in embed.new_patch_size)
        return cls(module, name.endswith("attn_in"), grid, window, int(model.cls_token.shape[1]))

    def geometry_key(self, call: SdpaCall) -> tuple:
        return type(self).__name__, self.inner, self.grid, self.window, tuple(call.q.shape), str(call.q.device)

    def call_geometry(self, call: SdpaCall, geometry: TokenGeometry) -> CallGeometry:
        if not self.inner:
            return stage_self_attention(call, *self.grid, self.prefix, geometry,
                                        f"outer attention: {self.grid[0]}x{self.grid[1]} patches")
        fine = stage_geometry(self.grid[0] * self.window[0], self.grid[1] * self.window[1], geometry)
        return window_geometry(call, fine, self.window, self.grid[0] * self.grid[1],
                               f"inner attention: {self.window[0]}x{self.window[1]} sub-patch tokens per patch")


# --- NesT: attention inside each block of the nested grid ----------------------------------------------------
def _nest_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm's NesT Attention.forward with its blocks folded into the batch of a
    four-dimensional SDPA call (image-major, as the reader expects)."""
    B, T, N, C = x.shape
    heads = self.num_heads
    qkv = self.qkv(x).reshape(B, T, N, 3, heads, C // heads).permute(3, 0, 1, 4, 2, 5)  # (3, B, T, heads, N, d)
    q, k, v = (t.reshape(B * T, heads, N, -1) for t in qkv.unbind(0))
    x = F.scaled_dot_product_attention(q, k, v).reshape(B, T, heads, N, -1)
    x = x.permute(0, 1, 3, 4, 2).reshape(B, T, N, C)
    return self.proj_drop(self.proj(x))


_NestAttention = _timm_class("timm.models.nest", "Attention")


@register_adapter
class NestBlockAttention(HandMadeAttention):
    """NesT: (B, T, N, C) tokens, T square blocks of N tokens each, blocks row-major over the
    level's grid and tokens row-major in a block: windows of that grid."""

    name = "nest-blocks"
    module_type = _NestAttention
    requires = (_NestAttention,)
    replacement = staticmethod(_nest_forward)
    copies = copied(_NestAttention, "2c3e8dd3bbeda086")
    needs_model_grid = False

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.blocks: tuple[int, int] | None = None  # (T, N) of the last forward

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        def record(args: tuple) -> None:
            self.blocks = (int(args[0].shape[1]), int(args[0].shape[2]))

        with super().reading(), recording_input(self.module, record):
            yield

    def geometry_key(self, call: SdpaCall) -> tuple:
        return type(self).__name__, self.blocks, tuple(call.q.shape), str(call.q.device)

    def call_geometry(self, call: SdpaCall, geometry: TokenGeometry) -> CallGeometry:
        count, tokens = self.blocks
        side, blocks_side = math.isqrt(tokens), math.isqrt(count)
        if side * side != tokens or blocks_side * blocks_side != count:
            raise RuntimeError(f"NesT: {count} blocks of {tokens} tokens are not square")
        level = stage_geometry(side * blocks_side, side * blocks_side, geometry)
        return window_geometry(call, level, (side, side), count, f"blocks of {side}x{side} tokens")


# --- HieraDet (SAM 2): windows or the whole grid, at the block ------------------------------------------------
_HieraDetBlock = _timm_class("timm.models.hieradet_sam2", "MultiScaleBlock")
_HieraDetAttention = _timm_class("timm.models.hieradet_sam2", "MultiScaleAttention")


@register_adapter
class HieraDetWindowAttention(WindowBlockAttention):
    """HieraDet: most blocks attend in windows of the stage grid (no shift), some over the
    whole grid. Blocks that pool their queries at a stage change are not read."""

    name = "hieradet-windows"
    module_type = _HieraDetBlock
    requires = (_HieraDetBlock, _HieraDetAttention)

    @classmethod
    def reads(cls, module: nn.Module) -> bool:
        return (super().reads(module) and type(module.attn).forward is _HieraDetAttention.forward
                and module.attn.q_pool is None)

    def window(self) -> tuple[int, int]:
        size = tuple(int(w) for w in self.module.window_size)
        return size if any(size) else self.resolution


# --- Swin v2 "cr": scaled cosine attention in (shifted) windows ----------------------------------------------
def _swin_v2_cr_attention_forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """timm's SwinV2-cr WindowMultiHeadAttention.forward with its softmax handed to SDPA:
    normalised q and k times the clamped logit scale, plus the meta-network's relative bias
    and the shift mask."""
    Bw, L, C = x.shape
    q, k, v = self.qkv(x).view(Bw, L, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    logit_scale = torch.clamp(self.logit_scale.reshape(1, self.num_heads, 1, 1), max=math.log(1. / 0.01)).exp()
    bias = with_shift_mask(self._relative_positional_encodings(), mask, Bw)
    x = F.scaled_dot_product_attention(F.normalize(q, dim=-1) * logit_scale, F.normalize(k, dim=-1), v,
                                       attn_mask=bias, scale=1.0)
    x = x.transpose(1, 2).reshape(Bw, L, -1)
    return self.proj_drop(self.proj(x))


_SwinCrBlock = _timm_class("timm.models.swin_transformer_v2_cr", "SwinTransformerV2CrBlock")
_SwinCrAttention = _timm_class("timm.models.swin_transformer_v2_cr", "WindowMultiHeadAttention")


@register_adapter
class SwinV2CrWindowAttention(SwinBlockAttention):
    """Swin v2 "cr": as Swin v2, the module computes its attention by hand; while read,
    the same logits go to SDPA."""

    name = "swin-v2-cr-windows"
    module_type = _SwinCrBlock
    requires = (_SwinCrBlock, _SwinCrAttention)
    copies = copied(_SwinCrAttention, "a6502026d8883802")

    @classmethod
    def reads(cls, module: nn.Module) -> bool:
        return (super().reads(module) and type(module)._shifted_window_attn is _SwinCrBlock._shifted_window_attn
                and type(module.attn).forward is _SwinCrAttention.forward
                and not getattr(module.attn, "sequential_attn", False))

    def attention_reading(self):
        return forward_replaced(self.module.attn, _swin_v2_cr_attention_forward)

"""Adapters for timm's ViT families beyond its plain `Attention`.

Each one says how its module's attention reaches `F.scaled_dot_product_attention`, where the
reader answers it, and where the call's rows and keys sit on the image:

- rotary (EVA, EVA-02, `AttentionRope` ViTs) and relative position bias (BEiT, `vit_relpos`):
  the module's own `fused_attn` path passes q and k after the rotation, the bias as the mask; the
  tokens are the model's. Nothing to add but taking that path.
- class attention (CaiT, XCiT): the only query is the class token; read as such.
- CaiT's talking-heads self-attention and ConViT's gated positional self-attention (GPSA),
  which never call SDPA: while read, their forward is the module's own computation with the
  last step, attention @ v, handed to SDPA as the softmax of the log of the attention the
  module formed (`softmax(log A) = A`): the probes read exactly the attention the block
  uses (for GPSA, the gated mix of content and positional attention), and the output is
  unchanged to float rounding.
- Swin v1 / v2 (shifted) windows, read at the block, which knows its stage's resolution,
  window and shift: each window is a batch row of the call; tokens sit at the stage's
  spacing. In a shifted window, pairs of tokens the cyclic shift brought together from
  opposite sides of the image are masked by the module (-100 before the softmax: a weight
  below 1e-43 of the row's), so the window's own coordinates give the true distance of
  every pair that carries weight; keys outside a window have no weight at all.
- PVT-v2's spatial-reduction attention: queries on the stage grid, keys at the centres of
  the reduced grid (a strided convolution's cells, or an adaptive pool's bins).

Modules that attend across channels or otherwise have no token-to-token softmax are named
in `WHY_UNREAD`, so the probes say why they do not apply. Every adapter matches a module by
its exact forward (see `adapters.py`), is registered only where this timm has the classes it
`requires`, and one that runs a copy of a timm forward names it in `copies` with the
fingerprint of the source it was written for (a changed timm is refused, not read); the
tests compare each with the attention materialised independently and check the model's
output is unchanged.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import types
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from localitylab.attention.adapters import (WHY_UNREAD, AttentionAdapter, CallGeometry, CopiedForward, SdpaCall,
                                            TimmAttention, fused_attn, register_adapter)
from localitylab.attention.geometry import TokenGeometry


# The timm release the copies of timm forwards below were checked against (their fingerprints).
TIMM_WRITTEN_FOR = "1.0.31"


def copied(owner: type | None, fingerprint: str, attribute: str = "forward") -> tuple[CopiedForward, ...]:
    """An adapter's `copies`: it runs a copy of `owner.attribute` as timm TIMM_WRITTEN_FOR wrote it."""
    return () if owner is None else (CopiedForward(owner, attribute, fingerprint, TIMM_WRITTEN_FOR),)


def _timm_class(module: str, name: str) -> type[nn.Module] | None:
    """A timm class, or None where this timm version has no such class."""
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


WHY_UNREAD.update({
    "XCA": "cross-covariance attention: a softmax over channels, not between tokens",
    "CrossCovarianceAttn": "cross-covariance attention: a softmax over channels, not between tokens",
    "ChannelAttention": "channel attention: a softmax over channels, not between tokens",
    "ChannelAttentionV2": "channel attention: a softmax over channels, not between tokens",
    "OutlookAttention": "outlook attention: weights generated per token for its local window, no query-key softmax",
    "LinearSelfAttention": "linear attention: no softmax over tokens",
    "FactorAttnConvRelPosEnc": "factorised attention: a softmax over each key channel, not between tokens",
    "AttentionPoolLatent": "attention pooling: a learned latent query, not one of the image's tokens",
    "CrossAttention": "cross-attention between CrossViT's two branches' class tokens and the other branch",
})


# --- the attention as a softmax SDPA can be handed ---------------------------------------------------
def attention_through_sdpa(attention: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """attention @ values, computed as SDPA of zero queries and keys with the additive mask
    log(attention): softmax(0 + log A) = A / sum(A) = A for rows that sum to one. So a module
    that forms its attention by hand hands it to SDPA, where the reader reads it."""
    zeros = attention.new_zeros(*attention.shape[:-1], 1)
    keys = attention.new_zeros(*attention.shape[:-2], attention.shape[-1], 1)
    return F.scaled_dot_product_attention(zeros, keys, values, attn_mask=attention.log(), scale=1.0)


def logits_through_sdpa(logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """softmax(logits) @ values through SDPA (the logits as its additive mask)."""
    zeros = logits.new_zeros(*logits.shape[:-1], 1)
    keys = logits.new_zeros(*logits.shape[:-2], logits.shape[-1], 1)
    return F.scaled_dot_product_attention(zeros, keys, values, attn_mask=logits, scale=1.0)


@contextlib.contextmanager
def forward_replaced(module: nn.Module, forward: Callable) -> Iterator[None]:
    """While active, `module` runs `forward(module, ...)` (an instance attribute over its class's)."""
    module.forward = types.MethodType(forward, module)
    try:
        yield
    finally:
        del module.forward


@contextlib.contextmanager
def recording_input(module: nn.Module, record: Callable[[tuple], None]) -> Iterator[None]:
    """While active, `record(args)` sees the positional arguments of each forward of `module`."""
    handle = module.register_forward_pre_hook(lambda _, args: record(args))
    try:
        yield
    finally:
        handle.remove()


# --- the model's own tokens: rotary embeddings and relative position biases ---------------------------
class FusedAttnSelfAttention(AttentionAdapter):
    """A timm module whose `fused_attn` path passes the attention it computes to SDPA (rotary
    q and k, a relative bias as the mask) over the model's tokens."""

    def reading(self):
        return fused_attn(self.module)


def _fused_attn_adapter(name: str, module: str, class_name: str, doc: str) -> type[FusedAttnSelfAttention]:
    """The adapter of timm's `module.class_name`, read on its `fused_attn` path."""
    cls = _timm_class(module, class_name)
    return type(f"FusedAttn{class_name}", (FusedAttnSelfAttention,),
                {"name": name, "module_type": cls, "requires": (cls,), "__doc__": doc})


register_adapter(_fused_attn_adapter(
    "eva-rotary", "timm.models.eva", "EvaAttention",
    "EVA / EVA-02 attention: q and k rotated (rotary embedding) before its `fused_attn` SDPA call."))
register_adapter(_fused_attn_adapter(
    "rope-attention", "timm.layers.attention", "AttentionRope",
    "timm's AttentionRope (rotary ViTs): q and k rotated before its `fused_attn` SDPA call."))
register_adapter(_fused_attn_adapter(
    "beit-relative-bias", "timm.models.beit", "Attention",
    "BEiT attention: the relative position bias is the SDPA call's additive mask."))
register_adapter(_fused_attn_adapter(
    "relpos-bias", "timm.models.vision_transformer_relpos", "RelPosAttention",
    "vit_relpos attention: the relative position bias is the SDPA call's additive mask."))
register_adapter(_fused_attn_adapter(
    "gemma4-rotary", "timm.models.gemma4_vit", "Gemma4Attention",
    "Gemma 4's vision attention: q and k normalised and rotated (2-D rotary) before its `fused_attn` SDPA call."))


# --- class attention: the only query is the class token --------------------------------------------
_ClassAttn = _timm_class("timm.models.cait", "ClassAttn")


@register_adapter
class ClassAttention(AttentionAdapter):
    """CaiT's and XCiT's class attention: the class token attends over itself and the patch
    tokens; there is no patch query. Read as such: the probes report its prefix share
    and entropy, and say that a distance needs a query position."""

    name = "class-attention"
    module_type = _ClassAttn
    requires = (_ClassAttn,)

    def reading(self):
        return fused_attn(self.module)

    def call_geometry(self, call: SdpaCall, geometry: TokenGeometry) -> CallGeometry:
        device = call.q.device
        centres = geometry.centres(device, torch.float64)
        prefix_keys = call.num_keys - geometry.num_grid_tokens
        queries = torch.full((call.num_queries, 2), float("nan"), dtype=torch.float64, device=device)
        return CallGeometry(torch.arange(call.num_queries, device=device), queries, centres, prefix_keys,
                            torch.arange(call.q.shape[0], device=device), class_query=True,
                            note="class attention: the class token is the only query")


class HandMadeAttention(AttentionAdapter):
    """A module that forms its attention by hand (never calling SDPA): while read, its forward
    is `replacement`, the module's own computation with its attention handed to SDPA; the
    tokens are the model's, and `note` says what is read."""

    replacement: Callable = staticmethod(lambda module, x: x)
    note: str = ""

    def reading(self):
        return forward_replaced(self.module, self.replacement)

    def call_geometry(self, call: SdpaCall, geometry: TokenGeometry) -> CallGeometry:
        where = super().call_geometry(call, geometry)
        where.note = self.note
        return where


# --- ConViT: gated positional self-attention, and its plain layers ---------------------------------
def _gpsa_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm's GPSA.forward, with attention @ v handed to SDPA (`attention_through_sdpa`)."""
    B, N, C = x.shape
    if self.rel_indices is None or self.rel_indices.shape[1] != N:
        self.rel_indices = self.get_rel_indices(N)
    attn = self.get_attention(x)  # the gated mix of content and positional attention, renormalised
    v = self.v(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
    x = attention_through_sdpa(attn, v).transpose(1, 2).reshape(B, N, C)
    return self.proj_drop(self.proj(x))


def _mhsa_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm's ConViT MHSA.forward through SDPA: softmax(q k^T scale) @ v is what SDPA computes."""
    B, N, C = x.shape
    q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    x = F.scaled_dot_product_attention(q, k, v, scale=self.scale).transpose(1, 2).reshape(B, N, C)
    return self.proj_drop(self.proj(x))


_GPSA = _timm_class("timm.models.convit", "GPSA")
_MHSA = _timm_class("timm.models.convit", "MHSA")


@register_adapter
class GatedPositionalSelfAttention(HandMadeAttention):
    """ConViT's GPSA: (1 - sigmoid(g)) softmax(q k^T) + sigmoid(g) softmax(positional
    scores), renormalised: the attention the block really applies, read whole. Its
    layers run on the patch tokens alone (the class token joins later)."""

    name = "convit-gpsa"
    module_type = _GPSA
    requires = (_GPSA,)
    replacement = staticmethod(_gpsa_forward)
    copies = copied(_GPSA, "b69061eeb206c989")
    note = "gated positional self-attention: the gated mix of content and positional attention"


@register_adapter
class ConvitSelfAttention(HandMadeAttention):
    """ConViT's plain self-attention layers (after its GPSA layers), through SDPA."""

    name = "convit-mhsa"
    module_type = _MHSA
    requires = (_MHSA,)
    replacement = staticmethod(_mhsa_forward)
    copies = copied(_MHSA, "fd9ae322ccfacc0e")


# --- CaiT: talking-heads self-attention ----------------------------------------------------------------
def _talking_heads_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm's TalkingHeadAttn.forward with its softmax handed to SDPA.

    The module mixes heads before the softmax (proj_l) and after it (proj_w):
    out_h = sum_g W[h, g] softmax(L_g) @ v_h + b_h sum_k v_h[k], L the proj_l-mixed logits.
    So each softmax(L_g) is applied to every head's values at once (one SDPA call whose
    values are all heads' v side by side), and proj_w's weights mix the results."""
    B, N, C = x.shape
    heads = self.num_heads
    qkv = self.qkv(x).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
    logits = self.proj_l((q @ k.transpose(-2, -1)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, g, N, N)
    every_head = v.permute(0, 2, 1, 3).reshape(B, 1, N, C).expand(B, heads, N, C)  # (B, g, N, h * d)
    mixed = logits_through_sdpa(logits, every_head).reshape(B, heads, N, heads, C // heads)  # (B, g, N, h, d)
    out = torch.einsum("hg,bgnhd->bhnd", self.proj_w.weight, mixed)
    if self.proj_w.bias is not None:
        out = out + self.proj_w.bias.view(1, heads, 1, 1) * v.sum(dim=2, keepdim=True)
    x = out.transpose(1, 2).reshape(B, N, C)
    return self.proj_drop(self.proj(x))


_TalkingHeads = _timm_class("timm.models.cait", "TalkingHeadAttn")


@register_adapter
class TalkingHeadsAttention(HandMadeAttention):
    """CaiT's self-attention layers (patch tokens only). The rows read are the softmax of
    the proj_l-mixed logits, one distribution per head; proj_w then mixes them across
    heads, so the weights applied to the values are their combinations."""

    name = "cait-talking-heads"
    module_type = _TalkingHeads
    requires = (_TalkingHeads,)
    replacement = staticmethod(_talking_heads_forward)
    copies = copied(_TalkingHeads, "38ef28f1ac21c77d")
    note = "talking heads: each head's softmax of the proj_l-mixed logits (proj_w mixes heads after it)"


# --- Swin: (shifted) windows, read at the block --------------------------------------------------------
def stage_geometry(height: int, width: int, geometry: TokenGeometry) -> TokenGeometry:
    """The (height x width) token grid of a stage, placed on the model's input image: tokens
    are image side / grid side pixels apart (docs/probes.md, Geometry)."""
    image_h, image_w = geometry.image_shape
    spacing_h, spacing_w = image_h / height, image_w / width
    spacing = spacing_h if math.isclose(spacing_h, spacing_w) else max(spacing_h, spacing_w)
    return TokenGeometry((height, width), int(spacing) if float(spacing).is_integer() else spacing, 0)


def window_geometry(call: SdpaCall, stage: TokenGeometry, window: tuple[int, int], windows_per_image: int,
                    note: str) -> CallGeometry:
    """A call whose batch rows are windows of `window` tokens (image-major: row r is image
    r // windows_per_image): each window's tokens in its own coordinates, at the stage's spacing."""
    device = call.q.device
    rows, cols = torch.meshgrid(torch.arange(window[0], dtype=torch.float64),
                                torch.arange(window[1], dtype=torch.float64), indexing="ij")
    centres = (torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1) + 0.5).to(device) * stage.patch_size
    images = torch.arange(call.q.shape[0], device=device) // windows_per_image
    not_model_tokens = torch.full((call.num_queries,), -1, device=device)  # a window's rows are not the model's tokens
    return CallGeometry(not_model_tokens, centres, centres, 0, images, grid=stage, note=note)


class WindowBlockAttention(AttentionAdapter):
    """A block whose attention runs in windows of its stage's grid (Swin, SAM, TinyViT),
    read at the block: it sees the stage's resolution (its input is (B, H, W, C)) and knows
    its window and shift. Subclasses say where the attention module is, its window and
    shift, and how it reaches SDPA."""

    needs_model_grid = False

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.resolution: tuple[int, int] | None = None

    @property
    def attention(self) -> nn.Module:
        return self.module.attn

    @property
    def num_heads(self) -> int:
        return int(self.attention.num_heads)

    def window(self) -> tuple[int, int]:
        return tuple(int(w) for w in self.module.window_size)

    def shift(self) -> tuple[int, int]:
        return 0, 0

    def attention_reading(self) -> contextlib.AbstractContextManager:
        return fused_attn(self.attention)

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        def record(args: tuple) -> None:
            self.resolution = (int(args[0].shape[1]), int(args[0].shape[2]))  # x: (B, H, W, C)

        with self.attention_reading(), recording_input(self.module, record):
            yield

    def geometry_key(self, call: SdpaCall) -> tuple:
        return (type(self).__name__, self.resolution, self.window(), self.shift(), tuple(call.q.shape),
                str(call.q.device))

    def call_geometry(self, call: SdpaCall, geometry: TokenGeometry) -> CallGeometry:
        height, width = self.resolution
        window, shift = self.window(), self.shift()
        padded = (math.ceil(height / window[0]) * window[0], math.ceil(width / window[1]) * window[1])
        per_image = (padded[0] // window[0]) * (padded[1] // window[1])
        note = f"windows of {window[0]}x{window[1]} tokens" + (f", shifted by {shift[0]},{shift[1]}" if any(shift)
                                                                else "")
        if padded != (height, width):
            note += f"; the {height}x{width} grid padded to {padded[0]}x{padded[1]} (padding tokens attend, as in the block)"
        return window_geometry(call, stage_geometry(height, width, geometry), window, per_image, note)


class SwinBlockAttention(WindowBlockAttention):
    """A Swin block: its window and its shift (half a window in every other block)."""

    def shift(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.module.shift_size)


_SwinBlock = _timm_class("timm.models.swin_transformer", "SwinTransformerBlock")
_SwinV2Block = _timm_class("timm.models.swin_transformer_v2", "SwinTransformerV2Block")


@register_adapter
class SwinWindowAttention(SwinBlockAttention):
    """Swin v1: the block's WindowAttention passes q, k and the relative bias (plus the
    shift mask) to SDPA on its `fused_attn` path."""

    name = "swin-windows"
    module_type = _SwinBlock
    requires = (_SwinBlock,)

    @classmethod
    def reads(cls, module: nn.Module) -> bool:
        return super().reads(module) and type(module)._attn is _SwinBlock._attn and hasattr(module.attn, "fused_attn")


def with_shift_mask(bias: torch.Tensor, mask: torch.Tensor | None, rows: int) -> torch.Tensor:
    """A window attention's (1, heads, N, N) bias plus, for shifted windows, the (windows, N, N)
    shift mask of each window: (rows, heads, N, N) for a call of `rows` windows, image-major."""
    if mask is None:
        return bias
    windows, heads, tokens = mask.shape[0], bias.shape[1], bias.shape[-1]
    bias = (bias.unsqueeze(0) + mask.unsqueeze(1).unsqueeze(0)).expand(rows // windows, -1, -1, -1, -1)
    return bias.reshape(rows, heads, tokens, tokens)


def _swin_v2_attention_forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """timm's Swin v2 WindowAttention.forward with its softmax handed to SDPA: cosine
    attention (normalised q and k times the clamped logit scale) plus 16 sigmoid(the
    continuous relative bias), plus the shift mask."""
    B_, N, C = x.shape
    if self.q_bias is None:
        qkv = self.qkv(x)
    else:
        qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        if self.qkv_bias_separate:
            qkv = self.qkv(x)
            qkv += qkv_bias
        else:
            qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
    q, k, v = qkv.reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    logit_scale = torch.clamp(self.logit_scale, max=math.log(1. / 0.01)).exp()
    table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
    bias = table[self.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1).contiguous()
    bias = with_shift_mask((16 * torch.sigmoid(bias)).unsqueeze(0), mask, B_)
    x = F.scaled_dot_product_attention(F.normalize(q, dim=-1) * logit_scale, F.normalize(k, dim=-1), v,
                                       attn_mask=bias, scale=1.0)
    x = x.transpose(1, 2).reshape(B_, N, C)
    return self.proj_drop(self.proj(x))


_SwinV2Attention = _timm_class("timm.models.swin_transformer_v2", "WindowAttention")


@register_adapter
class SwinV2WindowAttention(SwinBlockAttention):
    """Swin v2: scaled cosine attention with a continuous relative bias, which the module
    computes by hand; while read, the same logits go to SDPA."""

    name = "swin-v2-windows"
    module_type = _SwinV2Block
    requires = (_SwinV2Block, _SwinV2Attention)
    copies = copied(_SwinV2Attention, "58f86b26e64bed74")

    @classmethod
    def reads(cls, module: nn.Module) -> bool:
        return (super().reads(module) and type(module)._attn is _SwinV2Block._attn
                and type(module.attn).forward is _SwinV2Attention.forward)

    def attention_reading(self):
        return forward_replaced(self.module.attn, _swin_v2_attention_forward)


class StageSizedAttention(AttentionAdapter):
    """A module told its stage's grid size: `forward(x, (H, W))` (PVT-v2, Twins). Subclasses
    say how its attention reaches SDPA (`attention_path`) and place the call's tokens."""

    needs_model_grid = False

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.resolution: tuple[int, int] | None = None

    def attention_path(self) -> contextlib.AbstractContextManager:
        raise NotImplementedError

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        def record(args: tuple) -> None:
            self.resolution = (int(args[1][0]), int(args[1][1]))

        with self.attention_path(), recording_input(self.module, record):
            yield


# --- PVT-v2: spatial-reduction attention -----------------------------------------------------------------
_PvtAttention = _timm_class("timm.models.pvt_v2", "Attention")


@register_adapter
class SpatialReductionAttention(StageSizedAttention):
    """PVT-v2: queries are the stage's tokens; keys and values come from a reduced grid
    (a strided convolution of `sr_ratio`, or for the linear variant an adaptive average
    pool), each key at the centre of the tokens it summarises."""

    name = "pvt-spatial-reduction"
    module_type = _PvtAttention
    requires = (_PvtAttention,)

    def attention_path(self):
        return fused_attn(self.module)

    def geometry_key(self, call: SdpaCall) -> tuple:
        return type(self).__name__, id(self.module), self.resolution, tuple(call.q.shape), tuple(call.k.shape)

    def call_geometry(self, call: SdpaCall, geometry: TokenGeometry) -> CallGeometry:
        height, width = self.resolution
        stage = stage_geometry(height, width, geometry)
        device = call.q.device
        queries = stage.centres(device, torch.float64)
        rows, cols, note = self.key_cells(height, width)
        spacing = float(stage.patch_size)
        keys = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2).to(device) * spacing
        if len(keys) != call.num_keys:
            raise RuntimeError(f"PVT attention: {len(keys)} key cells placed for {call.num_keys} keys")
        not_model_tokens = torch.full((call.num_queries,), -1, device=device)
        return CallGeometry(not_model_tokens, queries, keys, 0, torch.arange(call.q.shape[0], device=device),
                            grid=stage, note=note)

    def key_cells(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        """The centres, in tokens of the stage grid, of the key rows and columns."""
        module = self.module
        if getattr(module, "pool", None) is not None:  # adaptive average pool to a fixed size, then a 1x1 projection
            size = module.pool.output_size
            size = (size, size) if isinstance(size, int) else tuple(size)

            def bins(length: int, count: int) -> torch.Tensor:
                starts = [math.floor(i * length / count) for i in range(count)]
                ends = [math.ceil((i + 1) * length / count) for i in range(count)]
                return torch.tensor([(a + b) / 2 for a, b in zip(starts, ends)], dtype=torch.float64)

            return bins(height, size[0]), bins(width, size[1]), f"keys from a {size[0]}x{size[1]} adaptive pool"
        if module.sr is not None:
            ratio = module.sr.stride[0]
            count_h, count_w = height // ratio, width // ratio
            centres = lambda count: (torch.arange(count, dtype=torch.float64) + 0.5) * ratio  # noqa: E731
            return centres(count_h), centres(count_w), f"keys from a {count_h}x{count_w} grid (spatial reduction {ratio})"
        return ((torch.arange(height, dtype=torch.float64) + 0.5), (torch.arange(width, dtype=torch.float64) + 0.5),
                "keys on the stage grid (no reduction)")


# --- CrossViT: two branches of timm Attention, each on its own grid ------------------------------------
_CrossVit = _timm_class("timm.models.crossvit", "CrossVit")
@register_adapter
class CrossVitBranchAttention(AttentionAdapter):
    """CrossViT: each branch embeds the image (resized to its own size) with its own patch
    size and attends over its class token and its own grid: branch b's tokens are the
    image side over its grid side apart. (The fusion layers, where one branch's class
    token attends over the other branch, are cross-attention and not read.)"""

    name = "crossvit-branch"
    module_type = TimmAttention.module_type
    requires = (_CrossVit,)
    precedence = 1  # timm's plain Attention, but inside CrossViT: asked before timm-attention
    needs_model_grid = False

    def __init__(self, module: nn.Module, grid: tuple[int, int] = (0, 0), branch: int = 0) -> None:
        super().__init__(module)
        self.grid, self.branch = grid, branch

    @classmethod
    def reads_in(cls, module: nn.Module, model: nn.Module, name: str) -> bool:
        return isinstance(model, _CrossVit) and cls.reads(module) and cls._branch(name) is not None

    @staticmethod
    def _branch(name: str) -> int | None:
        parts = name.split(".")  # blocks.<i>.blocks.<branch>.<j>.attn
        if len(parts) == 6 and parts[0] == "blocks" and parts[2] == "blocks" and parts[5] == "attn":
            return int(parts[3])
        return None

    @classmethod
    def bound(cls, module: nn.Module, model: nn.Module, name: str) -> "CrossVitBranchAttention":
        branch = cls._branch(name)
        embed = model.patch_embed[branch]
        grid = tuple(int(embed.img_size[axis] // embed.patch_size[axis]) for axis in (0, 1))
        return cls(module, grid, branch)

    def reading(self):
        return fused_attn(self.module)

    def geometry_key(self, call: SdpaCall) -> tuple:
        return type(self).__name__, self.branch, tuple(call.q.shape), str(call.q.device)

    def call_geometry(self, call: SdpaCall, geometry: TokenGeometry) -> CallGeometry:
        stage = stage_geometry(*self.grid, geometry)
        device = call.q.device
        prefix = call.num_keys - stage.num_grid_tokens
        centres = stage.centres(device, torch.float64)
        queries = torch.cat([torch.full((prefix, 2), float("nan"), dtype=torch.float64, device=device), centres])
        return CallGeometry(torch.full((call.num_queries,), -1, device=device), queries, centres, prefix,
                            torch.arange(call.q.shape[0], device=device), grid=stage,
                            note=f"branch {self.branch}: {self.grid[0]}x{self.grid[1]} tokens")


# --- TinyViT and SAM: windows without a shift --------------------------------------------------------
_TinyVitBlock = _timm_class("timm.models.tiny_vit", "TinyVitBlock")
_TinyVitAttention = _timm_class("timm.models.tiny_vit", "Attention")


@register_adapter
class TinyVitWindowAttention(WindowBlockAttention):
    """TinyViT: attention (with its learned attention biases, passed as SDPA's mask) in
    windows of the stage grid; one window when the grid is the window's size."""

    name = "tinyvit-windows"
    module_type = _TinyVitBlock
    requires = (_TinyVitBlock, _TinyVitAttention)

    @classmethod
    def reads(cls, module: nn.Module) -> bool:
        return (super().reads(module) and type(module.attn).forward is _TinyVitAttention.forward
                and hasattr(module.attn, "fused_attn"))

    def window(self) -> tuple[int, int]:
        height, width = self.resolution
        size = int(self.module.window_size)
        return (height, width) if (height, width) == (size, size) else (size, size)


def _sam_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm's SAM ViT Attention.forward with a four-dimensional SDPA call (batch, heads,
    tokens, channels) where the module folds the heads into the batch."""
    from timm.layers import apply_rot_embed_cat
    from timm.models.vision_transformer_sam import get_decomposed_rel_pos_bias

    B, H, W, _ = x.shape
    N = H * W
    x = x.reshape(B, N, -1)
    qkv = self.qkv(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, B * self.num_heads, N, -1).unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    if self.use_rel_pos:
        attn_bias = get_decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (H, W), (H, W))
        attn_bias = attn_bias.reshape(B, self.num_heads, N, N)
    else:
        attn_bias = None
        if self.rope is not None:
            rope = self.rope.get_embed()
            q = apply_rot_embed_cat(q, rope).type_as(v)
            k = apply_rot_embed_cat(k, rope).type_as(v)
    q, k, v = (t.reshape(B, self.num_heads, N, -1) for t in (q, k, v))
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
    x = x.transpose(1, 2).reshape(B, N, -1)
    return self.proj_drop(self.proj(x)).view(B, H, W, -1)


_SamBlock = _timm_class("timm.models.vision_transformer_sam", "Block")
_SamAttention = _timm_class("timm.models.vision_transformer_sam", "Attention")


@register_adapter
class SamWindowAttention(WindowBlockAttention):
    """SAM's ViT: most blocks attend in windows (no shift), some over the whole grid, all
    with a decomposed relative position bias."""

    name = "sam-windows"
    module_type = _SamBlock
    requires = (_SamBlock, _SamAttention)
    copies = copied(_SamAttention, "f0355c1a5174616c")

    @classmethod
    def reads(cls, module: nn.Module) -> bool:
        return super().reads(module) and type(module.attn).forward is _SamAttention.forward

    def window(self) -> tuple[int, int]:
        size = int(self.module.window_size)
        return (size, size) if size > 0 else self.resolution

    def attention_reading(self):
        return forward_replaced(self.attention, _sam_attention_forward)


# --- Twins: locally grouped windows, and global sub-sampled keys --------------------------------------
def _lsa_forward(self, x: torch.Tensor, size) -> torch.Tensor:
    """timm's Twins LocallyGroupedAttn.forward (the padding variant) with its windows folded
    into the batch of a four-dimensional SDPA call (image-major, as the reader expects)."""
    B, N, C = x.shape
    H, W = size
    x = x.view(B, H, W, C)
    pad_r = (self.ws - W % self.ws) % self.ws
    pad_b = (self.ws - H % self.ws) % self.ws
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, Hp, Wp, _ = x.shape
    _h, _w = Hp // self.ws, Wp // self.ws
    x = x.reshape(B, _h, self.ws, _w, self.ws, C).transpose(2, 3)
    qkv = self.qkv(x).reshape(B, _h * _w, self.ws * self.ws, 3, self.num_heads, C // self.num_heads).permute(
        3, 0, 1, 4, 2, 5)
    q, k, v = (t.reshape(B * _h * _w, self.num_heads, self.ws * self.ws, -1) for t in qkv.unbind(0))
    x = F.scaled_dot_product_attention(q, k, v).reshape(B, _h * _w, self.num_heads, self.ws * self.ws, -1)
    x = x.transpose(2, 3).reshape(B, _h, _w, self.ws, self.ws, C)
    x = x.transpose(2, 3).reshape(B, _h * self.ws, _w * self.ws, C)
    if pad_r > 0 or pad_b > 0:
        x = x[:, :H, :W, :].contiguous()
    return self.proj_drop(self.proj(x.reshape(B, N, C)))


_LocallyGrouped = _timm_class("timm.models.twins", "LocallyGroupedAttn")
_GlobalSubSample = _timm_class("timm.models.twins", "GlobalSubSampleAttn")


@register_adapter
class LocallyGroupedAttention(StageSizedAttention):
    """Twins' locally grouped attention: windows of `ws` tokens of the stage grid."""

    name = "twins-local-windows"
    module_type = _LocallyGrouped
    requires = (_LocallyGrouped,)
    copies = copied(_LocallyGrouped, "7ec97a50680a57b4")

    def attention_path(self):
        return forward_replaced(self.module, _lsa_forward)

    def geometry_key(self, call: SdpaCall) -> tuple:
        return type(self).__name__, self.resolution, int(self.module.ws), tuple(call.q.shape), str(call.q.device)

    def call_geometry(self, call: SdpaCall, geometry: TokenGeometry) -> CallGeometry:
        height, width = self.resolution
        size = int(self.module.ws)
        per_image = math.ceil(height / size) * math.ceil(width / size)
        return window_geometry(call, stage_geometry(height, width, geometry), (size, size), per_image,
                               f"windows of {size}x{size} tokens")


@register_adapter
class GlobalSubSampledAttention(SpatialReductionAttention):
    """Twins' global sub-sampled attention: keys from the stage grid reduced by a strided
    convolution, as in PVT."""

    name = "twins-global-subsampled"
    module_type = _GlobalSubSample
    requires = (_GlobalSubSample,)

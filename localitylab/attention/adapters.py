"""One small adapter per attention implementation: how that module forms its attention logits.

An adapter reads the inputs a module's forward receives and returns the scaled queries,
the keys and whatever the module adds to the logits (a mask, a bias), exactly as the
module computes them; the reader (`reader.py`) forms blocks of logit rows from that. The
probes never know which implementation they read. Adding a family (rotary, relative
bias, windows, ...) is one subclass here and one `@register_adapter` line.

An adapter matches a module by its exact forward: a subclass that overrides `forward`
computes something else, so it is not read with its parent's adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn


@dataclass
class QueryKeys:
    """What one forward of an attention module attends with: everything its logits are made of."""

    q: torch.Tensor  # (B, heads, N, head_dim), already scaled as the module scales it
    k: torch.Tensor  # (B, heads, N_keys, head_dim)
    attn_mask: torch.Tensor | None = None  # bool (True = allowed) or additive, broadcastable to (B, heads, N, N_keys)
    is_causal: bool = False

    @property
    def num_heads(self) -> int:
        return self.q.shape[1]

    @property
    def num_queries(self) -> int:
        return self.q.shape[2]

    @property
    def num_keys(self) -> int:
        return self.k.shape[2]

    def scores(self, rows: torch.Tensor) -> torch.Tensor:
        """Attention logits (B, heads, len(rows), N_keys) of the query tokens `rows`, masked as
        the module masks them (-inf where a key is not allowed)."""
        scores = self.q[:, :, rows] @ self.k.transpose(-2, -1)
        tokens = self.num_keys
        if self.is_causal:  # as timm's resolve_self_attn_mask, for these rows only
            keys = torch.arange(tokens, device=scores.device)
            scores = scores.masked_fill(keys[None, :] > rows[:, None], float("-inf"))
        elif self.attn_mask is not None:
            mask = self.attn_mask
            if mask.dim() >= 2 and mask.shape[-2] == self.num_queries:
                mask = mask[..., rows, :]
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, float("-inf"))
            else:
                scores = scores + mask
        return scores


class AttentionAdapter:
    """Base: `module_forward` is the forward this adapter knows how to mirror."""

    name: ClassVar[str] = ""
    module_forward: ClassVar[Any] = None  # the function object of the forward it mirrors

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @classmethod
    def reads(cls, module: nn.Module) -> bool:
        return cls.module_forward is not None and getattr(type(module), "forward", None) is cls.module_forward

    @property
    def num_heads(self) -> int:
        return int(self.module.num_heads)

    def query_keys(self, args: tuple, kwargs: dict[str, Any]) -> QueryKeys:
        """The module's q (scaled), k and mask, from the arguments its forward was called with."""
        raise NotImplementedError


_ADAPTERS: list[type[AttentionAdapter]] = []


def register_adapter(cls: type[AttentionAdapter]) -> type[AttentionAdapter]:
    if not cls.name or any(other.name == cls.name for other in _ADAPTERS):
        raise ValueError(f"attention adapter name {cls.name!r} missing or registered twice")
    _ADAPTERS.append(cls)
    return cls


def adapter_for(module: nn.Module) -> AttentionAdapter | None:
    """The adapter that reads `module`, or None."""
    for cls in _ADAPTERS:
        if cls.reads(module):
            return cls(module)
    return None


def adapter_names() -> list[str]:
    return [cls.name for cls in _ADAPTERS]


# --- timm's plain Attention (ViT, DeiT, our PiTs and ViTs) --------------------------------------
from timm.layers.attention import Attention as _TimmAttention  # noqa: E402


@register_adapter
class TimmAttention(AttentionAdapter):
    """timm's `Attention`: qkv projection, q_norm / k_norm, scale, optional mask; `norm` and
    `gate` act after attention @ v and do not change the attention itself."""

    name = "timm-attention"
    module_forward = _TimmAttention.forward

    @classmethod
    def reads(cls, module: nn.Module) -> bool:
        return isinstance(module, _TimmAttention) and type(module).forward is _TimmAttention.forward

    def query_keys(self, args: tuple, kwargs: dict[str, Any]) -> QueryKeys:
        module = self.module
        x = args[0] if args else kwargs["x"]
        attn_mask = args[1] if len(args) > 1 else kwargs.get("attn_mask")
        is_causal = args[2] if len(args) > 2 else kwargs.get("is_causal", False)
        batch, tokens, _ = x.shape
        qkv = module.qkv(x).reshape(batch, tokens, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
        q, k, _ = qkv.unbind(0)
        q, k = module.q_norm(q), module.k_norm(k)
        return QueryKeys(q * module.scale, k, attn_mask, bool(is_causal))

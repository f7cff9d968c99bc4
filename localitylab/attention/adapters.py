"""One small adapter per attention implementation: how to read that module's attention.

The reader (`reader.py`) sees the attention a module really computes by intercepting its
call to `torch.nn.functional.scaled_dot_product_attention`: the q, k and v it passes
(after its projections, qk-norm, rotary embedding...) and its mask or bias. An adapter
says the rest, which only it knows:

- `reading()`: how to make the module take that path for the duration of a probe (timm's
  modules: `fused_attn = True`; their manual path computes the same softmax);
- `call_geometry(call, geometry)`: where each query row and each key column of that call
  sits in input pixels, which keys are prefix tokens ([cls], registers), and which image
  each batch row of the call belongs to.

The probes never know which implementation they read. Adding a family (relative bias,
windows, spatial reduction, ...) is one subclass here with one `@register_adapter` line.
An adapter matches a module by its exact forward: a subclass that overrides `forward`
computes something else, so it is not read with its parent's adapter. Which adapter reads a
module is declared (`precedence`: adapters that read a class only inside a given model, as
PiT's stages and CrossViT's branches read timm's plain Attention, are asked first), not
left to import order.

An adapter that carries a copy of a timm forward (its computation with the softmax handed
to SDPA) names it in `copies`, with the fingerprint of the timm source it was written for:
where the installed timm's source differs, the adapter refuses (`refusal()`), and the probes
say the layer is not read and why instead of reading a computation the copy does not make.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import inspect
import math
import textwrap
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator

import torch
import torch.nn as nn
from timm.layers.attention import Attention as _TimmAttention

from localitylab.attention.geometry import TokenGeometry
from localitylab.errors import UserError


@dataclass
class SdpaCall:
    """The arguments of one `scaled_dot_product_attention` call, as the module made it."""

    q: torch.Tensor  # (R, heads, Nq, head_dim)
    k: torch.Tensor  # (R, heads or kv heads, Nk, head_dim)
    v: torch.Tensor  # (R, heads or kv heads, Nk, value_dim)
    attn_mask: torch.Tensor | None = None  # bool (True = attend) or additive, broadcastable to (R, heads, Nq, Nk)
    dropout_p: float = 0.0
    is_causal: bool = False
    scale: float | None = None
    enable_gqa: bool = False

    @classmethod
    def of(cls, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
           enable_gqa=False) -> "SdpaCall":
        return cls(query, key, value, attn_mask, float(dropout_p), bool(is_causal), scale, bool(enable_gqa))

    @property
    def scale_factor(self) -> float:
        return 1.0 / math.sqrt(self.q.shape[-1]) if self.scale is None else float(self.scale)

    @property
    def num_queries(self) -> int:
        return self.q.shape[-2]

    @property
    def num_keys(self) -> int:
        return self.k.shape[-2]

    def keys_and_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """k and v with one head per query head (grouped-query attention repeated out)."""
        if self.enable_gqa and self.k.shape[-3] != self.q.shape[-3]:
            repeat = self.q.shape[-3] // self.k.shape[-3]
            return self.k.repeat_interleave(repeat, -3), self.v.repeat_interleave(repeat, -3)
        return self.k, self.v

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """Attention logits (R, heads, len(rows), Nk) of the query rows `rows`, masked as
        the call masks them (-inf where a key is not allowed), as SDPA defines them."""
        keys, _ = self.keys_and_values()
        logits = (self.q[..., rows, :] * self.scale_factor) @ keys.transpose(-2, -1)
        if self.is_causal:
            allowed = torch.arange(self.num_keys, device=logits.device)[None, :] <= rows[:, None]
            logits = logits.masked_fill(~allowed, float("-inf"))
        elif self.attn_mask is not None:
            mask = self.attn_mask
            if mask.dim() >= 2 and mask.shape[-2] == self.num_queries:
                mask = mask[..., rows, :]
            logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
        return logits


def source_fingerprint(function: Callable) -> str:
    """A hash of a function's source as code: its syntax tree without the docstring, so
    comments, blank lines and formatting do not count, and any change to what it computes does."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    body = tree.body[0]
    if body.body and isinstance(body.body[0], ast.Expr) and isinstance(getattr(body.body[0], "value", None),
                                                                       ast.Constant):
        body.body = body.body[1:]
    body.name = ""  # an assigned function (a patched forward) keeps the name it was written with
    return hashlib.sha256(ast.dump(body, annotate_fields=False).encode()).hexdigest()[:16]


@functools.cache
def _fingerprint_of(function: Callable) -> str | None:
    try:
        return source_fingerprint(function)
    except (OSError, TypeError, SyntaxError, IndexError):  # no source to read (a compiled or generated function)
        return None


@dataclass(frozen=True)
class CopiedForward:
    """A timm function an adapter carries a copy of: `owner.attribute`, the fingerprint of its
    source when the copy was written (`source_fingerprint`) and that timm's version."""

    owner: type
    attribute: str
    fingerprint: str
    written_for: str

    def changed(self) -> str:
        """Why the installed timm's function is not the one copied, or "" where it is."""
        import timm

        name = f"{self.owner.__name__}.{self.attribute}"
        found = _fingerprint_of(getattr(self.owner, self.attribute))
        if found is None:
            return f"timm {timm.__version__}'s {name} has no readable source to check against the copy written " \
                   f"for timm {self.written_for}"
        if found != self.fingerprint:
            return f"timm {timm.__version__} changed {name}; this adapter was written for timm {self.written_for}"
        return ""


@dataclass(eq=False)
class CallGeometry:
    """Where the rows and columns of one attention call sit on the input image (the reader
    keeps one per adapter geometry key, `AttentionAdapter.geometry_key`)."""

    query_tokens: torch.Tensor  # (Nq,) each query row's index in the model's token order (prefix first)
    query_centres: torch.Tensor  # (Nq, 2) pixel centres of the query rows (NaN for prefix tokens)
    key_centres: torch.Tensor  # (Nk - num_prefix_keys, 2) pixel centres of the non-prefix keys
    num_prefix_keys: int  # keys [0, num_prefix_keys) are prefix tokens
    images: torch.Tensor  # (R,) the image (within the forward's batch) of each batch row of the call
    # The token grid this call's tokens belong to, for the probes' uniform-attention reference and
    # fractions of the image (a Swin stage, a PVT stage); None: the model's own grid.
    grid: TokenGeometry | None = None
    class_query: bool = False  # the only queries are prefix tokens (CaiT's class attention): read those
    note: str = ""  # what the probes should say about this layer's attention (windows, class attention, ...)

    def grid_rows(self) -> torch.Tensor:
        """The query rows the probes read by default: those that are not prefix tokens, or for
        class attention its prefix queries."""
        prefix = torch.isnan(self.query_centres[:, 0])
        return torch.nonzero(prefix if self.class_query else ~prefix).flatten()


class AttentionAdapter:
    """Base: subclasses set `name` and `module_type` (the forward they know), and override
    `reading` and `call_geometry` where the default (a self-attention over the model's
    whole token sequence, prefix first) is not what the module does."""

    name: ClassVar[str] = ""
    module_type: ClassVar[type[nn.Module] | None] = None
    # Asked before adapters of lower precedence: 1 for an adapter that reads a class only
    # inside a given model (its `reads_in`) where a general adapter reads the same class.
    precedence: ClassVar[int] = 0
    # The timm functions whose copies this adapter runs while reading (see the module's note).
    copies: ClassVar[tuple[CopiedForward, ...]] = ()
    # The classes (timm's) the adapter is written for, None where the installed timm lacks one:
    # then it is not registered.
    requires: ClassVar[tuple[type | None, ...]] = ()
    # Places its tokens with the model's one token grid (the default geometry). An adapter
    # that places them itself (stages, windows) reads models that have no such grid.
    needs_model_grid: ClassVar[bool] = True

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @classmethod
    def reads(cls, module: nn.Module) -> bool:
        return (cls.module_type is not None and isinstance(module, cls.module_type)
                and type(module).forward is cls.module_type.forward)

    @classmethod
    def refusal(cls) -> str:
        """Why this adapter will not read with the installed timm (a copied forward changed), or ""."""
        return next((why for why in (copy.changed() for copy in cls.copies) if why), "")

    @classmethod
    def reads_in(cls, module: nn.Module, model: nn.Module, name: str) -> bool:
        """Whether this adapter reads `module`, named `name` in `model` (by default: whatever
        the model around it)."""
        return cls.reads(module)

    @classmethod
    def bound(cls, module: nn.Module, model: nn.Module, name: str) -> "AttentionAdapter":
        """The adapter of `module` in `model` (one that needs the model around it keeps what it needs)."""
        return cls(module)

    @property
    def num_heads(self) -> int:
        return int(self.module.num_heads)

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """While active, the module computes its attention through SDPA."""
        yield

    def geometry_key(self, call: SdpaCall) -> tuple:
        """Calls with equal keys have equal geometry, so the reader computes it (and its
        distance table) once: by default, every module of this class at these shapes."""
        return type(self).__name__, tuple(call.q.shape), tuple(call.k.shape), str(call.q.device)

    def call_geometry(self, call: SdpaCall, geometry: TokenGeometry) -> CallGeometry:
        """A self-attention over the model's tokens: the whole sequence, prefix first, or the
        grid tokens alone (layers that run before the prefix is added: ConViT's GPSA, CaiT's
        self-attention)."""
        tokens = geometry.num_tokens
        prefix_count = geometry.num_prefix_tokens
        if call.num_queries == call.num_keys == geometry.num_grid_tokens:
            prefix_count = 0
        elif call.num_queries != tokens or call.num_keys != tokens:
            raise UserError(f"the model attends over {call.num_keys} tokens, but its grid {geometry.grid} and "
                            f"{geometry.num_prefix_tokens} prefix tokens make {tokens}; "
                            "attention probes need one token per grid cell")
        device = call.q.device
        centres = geometry.centres(device, torch.float64)
        prefix = torch.full((prefix_count, 2), float("nan"), dtype=torch.float64, device=device)
        first = geometry.num_prefix_tokens - prefix_count  # token indices stay the model's
        return CallGeometry(torch.arange(first, tokens, device=device), torch.cat([prefix, centres]), centres,
                            prefix_count, torch.arange(call.q.shape[0], device=device))


_ADAPTERS: list[type[AttentionAdapter]] = []  # in the order adapter_for asks them (precedence, then registration)

# Attention modules no adapter can read, and why (what the probes say instead of a number).
WHY_UNREAD: dict[str, str] = {}


def looks_like_attention(module: nn.Module) -> bool:
    """A module whose class says it is attention (the innermost such module is one layer)."""
    name = type(module).__name__
    return "attention" in name.lower() or "attn" in name.lower() or name in WHY_UNREAD


def why_unread(module: nn.Module) -> str:
    return WHY_UNREAD.get(type(module).__name__, "")


def register_adapter(cls: type[AttentionAdapter]) -> type[AttentionAdapter]:
    """Register an adapter class (the one way to, as a decorator): asked after those of higher
    `precedence` and after those of its own registered before it. An adapter whose `requires`
    this timm lacks is left out."""
    if any(required is None for required in cls.requires):
        return cls
    if not cls.name or any(other.name == cls.name for other in _ADAPTERS):
        raise ValueError(f"attention adapter name {cls.name!r} missing or registered twice")
    _ADAPTERS.append(cls)
    _ADAPTERS.sort(key=lambda adapter: -adapter.precedence)  # stable: registration order within a precedence
    return cls


def adapter_for(module: nn.Module, model: nn.Module | None = None, name: str = "") -> AttentionAdapter | None:
    """The adapter that reads `module` (named `name` in `model`, where known), or None: the
    first, by declared precedence, that reads it (CrossViT's branches and PiT's stages read
    timm's plain Attention inside those models, before the plain adapter). An adapter that
    refuses the installed timm (`refusal()`) is still the one returned: the reader names the
    layer as not read, with the reason."""
    for cls in _ADAPTERS:
        if cls.reads(module) if model is None else cls.reads_in(module, model, name):
            return cls(module) if model is None else cls.bound(module, model, name)
    return None


def adapter_names() -> list[str]:
    return [cls.name for cls in _ADAPTERS]


@contextlib.contextmanager
def fused_attn(module: nn.Module) -> Iterator[None]:
    """timm modules: `fused_attn` on (timm's switch to its `F.scaled_dot_product_attention`
    path) while active."""
    saved = module.fused_attn
    module.fused_attn = True
    try:
        yield
    finally:
        module.fused_attn = saved


# --- timm's plain Attention (ViT, DeiT, our PiTs and ViTs) --------------------------------------
@register_adapter
class TimmAttention(AttentionAdapter):
    """timm's `Attention`: qkv projection, q_norm / k_norm, scale, optional mask; `norm` and
    `gate` act after attention @ v and do not change the attention itself."""

    name = "timm-attention"
    module_type = _TimmAttention

    def reading(self):
        return fused_attn(self.module)


# --- diffusers' Attention (DiT, and the transformers of diffusers' pipelines) -------------------
@register_adapter
class DiffusersAttention(AttentionAdapter):
    """diffusers' `Attention` as a self-attention over the token grid (a DiT's `attn1`): its
    processor projects q, k, v, applies norm_q / norm_k, and `AttnProcessor2_0` calls SDPA.
    While read, a module whose processor is diffusers' plain `AttnProcessor` (the same
    attention, computed by `baddbmm` and softmax) takes `AttnProcessor2_0` instead; any
    other processor (a custom one) is refused, since what it computes is unknown."""

    name = "diffusers-attention"

    @classmethod
    def reads(cls, module: nn.Module) -> bool:
        import sys

        if "diffusers" not in sys.modules:  # no diffusers module can exist; do not import it
            return False
        from diffusers.models.attention_processor import Attention

        return (isinstance(module, Attention) and type(module).forward is Attention.forward
                and not module.is_cross_attention)

    @property
    def num_heads(self) -> int:
        return int(self.module.heads)

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        saved = self.module.processor
        if type(saved) is AttnProcessor:
            self.module.processor = AttnProcessor2_0()
        elif type(saved) is not AttnProcessor2_0:
            raise UserError(f"diffusers attention with the processor {type(saved).__name__} cannot be read; "
                            "attention probes read AttnProcessor2_0 (diffusers' default) and AttnProcessor")
        try:
            yield
        finally:
            self.module.processor = saved


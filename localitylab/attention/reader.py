"""Read a model's attention as it runs, at the cost of one forward pass.

While `read_attention` is active, every readable attention module (one with an adapter)
computes its attention through `torch.nn.functional.scaled_dot_product_attention`, and
that call is answered here: the query rows a probe reads are computed in blocks, each
block's softmax pieces go to the probe's `consume(block)`, and the same pieces give that
block's rows of the output (softmax @ v), so the attention is computed once and feeds both
the module and the probe. Rows the probe does not read go to the original SDPA kernel.
No layer's N x N map ever exists: memory grows with N x block (a PiT on a 224 x 224 image
has 50,177 tokens; one full fp32 map of one layer would be 40 GB).

A reader whose consumer needs only the per-row sums (`needs_weights=False`: attention-distance)
gets them, on a CPU, from a flash-attention kernel that accumulates them inside its online
softmax (`localitylab.attention.fused`): one block of all the rows, no block of weights.

The module's output equals its unprobed output to float rounding (checked in the tests),
and everything is restored on exit, error or not.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from localitylab.attention import fused
from localitylab.attention.adapters import AttentionAdapter, CallGeometry, SdpaCall, adapter_for
from localitylab.attention.geometry import TokenGeometry
from localitylab.attention.compiled import compiled, grid_pieces, keep_block_memory
from localitylab.errors import UserError

# The default query block holds this many attention logits (rows of the call x heads x
# block rows x keys), a few such temporaries per block; memory grows with N x block.
# On a CPU 4 MiB blocks stay in cache: 2.5-3.4x faster than 64 MiB ones (benchmarks/RESULTS.md).
# A GPU streams large blocks at full bandwidth and pays per kernel launch: 64 MiB ones.
BLOCK_ELEMENTS = {"cpu": 2**20, "cuda": 2**24}
# But every block reads all keys and values again, so a block of a few rows (long sequences,
# large batches) is bound by that reading: at least MIN_BLOCK_ROWS rows where that stays
# within MAX_BLOCK_ELEMENTS (pit-n at 16,385 tokens: 7.8x a forward with 16-row blocks, 4.1x
# with 64-row ones; benchmarks/RESULTS.md).
MIN_BLOCK_ROWS = 64
MAX_BLOCK_ELEMENTS = 2**24


@dataclass(frozen=True)
class AttentionLayer:
    """One attention module the reader can read, with its layer index (block order)."""

    index: int
    name: str
    module: nn.Module
    adapter: AttentionAdapter

    @property
    def num_heads(self) -> int:
        return self.adapter.num_heads


@dataclass
class AttentionBlock:
    """One block of query rows of one layer's attention, in the pieces every reduction needs.

    With s the logits, P prefix keys first and m the largest grid logit of each row:
    `grid_weights` w = exp(s_grid - m) (0 for masked keys) and `grid_total` Z = sum w, so the
    attention renormalised over grid keys is A' = w / Z (docs/probes.md); `weighted_shifted` =
    sum_k w (s - m) (masked keys left out); `prefix_lse` = logsumexp of the prefix logits
    (None without prefix keys). A block from the fused kernel (a reader told its consumer
    needs no weights) has no `logits` or `grid_weights` but `grid_distance`, sum_k w |c_q - c_k|
    in pixels, and float64 sums. Consumers must not modify these tensors in place.
    """

    layer: int
    logits: torch.Tensor | None  # (R, heads, b, Nk), float32 or float64
    grid_weights: torch.Tensor | None  # (R, heads, b, Nk - P)
    grid_total: torch.Tensor  # (R, heads, b)
    grid_max: torch.Tensor  # (R, heads, b, 1)
    weighted_shifted: torch.Tensor  # (R, heads, b)
    prefix_lse: torch.Tensor | None  # (R, heads, b)
    rows: torch.Tensor  # (b,) the block's query rows in the call
    where: CallGeometry
    grid_distance: torch.Tensor | None = None  # (R, heads, b), from the fused kernel only

    @property
    def query_tokens(self) -> torch.Tensor:
        """(b,) token indices (prefix included) of the block's query rows."""
        return self.where.query_tokens[self.rows]

    @property
    def images(self) -> torch.Tensor:
        return self.where.images

    @property
    def log_total(self) -> torch.Tensor:
        """logsumexp over every key, (R, heads, b)."""
        grid_lse = self.grid_max.squeeze(-1) + self.grid_total.log()
        return grid_lse if self.prefix_lse is None else torch.logaddexp(grid_lse, self.prefix_lse)

    def prefix_share(self) -> torch.Tensor:
        """The softmax mass on the prefix keys, (R, heads, b)."""
        if self.prefix_lse is None:
            return torch.zeros_like(self.grid_total)
        return (self.prefix_lse - self.log_total).exp()

    def entropy(self) -> torch.Tensor:
        """-sum A' log A' over the grid keys, (R, heads, b): log A' = (s - m) - log Z, so it
        is log Z - sum(w (s - m)) / Z."""
        return self.grid_total.log() - self.weighted_shifted / self.grid_total

    @property
    def query_centres(self) -> torch.Tensor:
        return self.where.query_centres[self.rows]

    def renormalised(self) -> torch.Tensor:
        """A' (R, heads, b, Nk - P): the attention renormalised over the grid keys."""
        return self.grid_weights / self.grid_total.unsqueeze(-1)

    def probs(self) -> torch.Tensor:
        """The softmax over every key (R, heads, b, Nk)."""
        return (self.logits - self.log_total.unsqueeze(-1)).exp()


Consumer = Callable[[AttentionBlock], None]


def attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """The readable attention modules of `model`, in the order the forward runs them. A
    layer's index is its place among all the model's attention modules, read or not, so
    it stays the block index in a model that mixes attention classes (XCiT's channel
    attention, then class attention)."""
    return [layer for layer in _attention_modules(model) if isinstance(layer, AttentionLayer)]


@dataclass(frozen=True)
class UnreadLayer:
    """An attention module no adapter reads, at its layer index, with why (when known)."""

    index: int
    name: str
    module: nn.Module
    why: str

    @property
    def class_name(self) -> str:
        return type(self.module).__name__


def unread_attention_layers(model: nn.Module) -> list[UnreadLayer]:
    """The attention modules of `model` that no adapter reads, at their layer indices."""
    return [layer for layer in _attention_modules(model) if isinstance(layer, UnreadLayer)]


# Per model, the modules found and the module tree they were found in: a probe asks three
# times per run (applies? read which? which are unread?), and each walk asks every adapter
# about every module (6 ms of a 40 ms probe of pit-n at 1,025 tokens).
_FOUND: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, list]]" = weakref.WeakKeyDictionary()


def _attention_modules(model: nn.Module) -> list[AttentionLayer | UnreadLayer]:
    tree = tuple((name, id(module)) for name, module in model.named_modules())
    known = _FOUND.get(model)
    if known is None or known[0] != tree:
        known = _FOUND[model] = tree, _find_attention_modules(model)
    return list(known[1])


def _find_attention_modules(model: nn.Module) -> list[AttentionLayer | UnreadLayer]:
    from localitylab.attention.adapters import looks_like_attention, why_unread

    found: list[AttentionLayer | UnreadLayer] = []
    inside: str | None = None  # the name of the read layer being walked (its submodules are part of it)
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside + "."):
            continue
        adapter = adapter_for(module, model, name)
        refusal = adapter.refusal() if adapter is not None else ""
        if refusal:  # the adapter's copy of a timm forward is not the installed timm's: not read, and why
            found.append(UnreadLayer(len(found), name, module, refusal))
            inside = name
        elif adapter is not None:
            found.append(AttentionLayer(len(found), name, module, adapter))
            inside = name
        elif looks_like_attention(module) and not any(
                looks_like_attention(child) or adapter_for(child) is not None
                for child_name, child in module.named_modules() if child_name):
            found.append(UnreadLayer(len(found), name, module, why_unread(module)))
    return found


def unread_attention_classes(model: nn.Module) -> list[str]:
    """Class names of modules that look like attention but that no adapter reads, each with
    why it cannot be read where that is known."""
    found = Counter((layer.class_name, layer.why) for layer in unread_attention_layers(model))
    return [f"{name} (x{count}{': ' + why if why else ''})" if count > 1 else name + (f" ({why})" if why else "")
            for (name, why), count in sorted(found.items())]


def default_query_block(rows: int, heads: int, keys: int, device: torch.device | str = "cpu") -> int:
    per_row = max(1, rows * heads * keys)
    preferred = BLOCK_ELEMENTS.get(torch.device(device).type, BLOCK_ELEMENTS["cuda"]) // per_row
    return max(1, preferred, min(MIN_BLOCK_ROWS, MAX_BLOCK_ELEMENTS // per_row))


def softmax_pieces(layer: int, logits: torch.Tensor, where: CallGeometry, rows: torch.Tensor,
                   values: torch.Tensor | None = None) -> tuple[AttentionBlock, torch.Tensor | None]:
    """An `AttentionBlock` from one block of logits (one exponential per grid logit, in the
    passes of `compiled.grid_pieces`) and, given the call's grid `values`, the block's
    weights @ values, the numerator of its rows of the output."""
    prefix = where.num_prefix_keys
    grid = logits[..., prefix:]
    weights, grid_max, total, weighted = compiled(grid_pieces, grid.shape[-1])(grid)
    numerator = weights @ values if values is not None else None
    prefix_lse = logits[..., :prefix].logsumexp(dim=-1) if prefix else None
    return AttentionBlock(layer, logits, weights, total, grid_max, weighted, prefix_lse, rows, where), numerator


def attend(layer: int, call: SdpaCall, where: CallGeometry, rows: torch.Tensor, consume: Consumer,
           query_block: int | None, original: Callable, needs_weights: bool = True) -> torch.Tensor:
    """The call's output; the rows `rows` computed here in blocks and handed to `consume`
    (in one block of sums from the fused kernel where `needs_weights` is False and it applies;
    `query_block` is then its query tile)."""
    if call.dropout_p > 0:
        raise UserError("attention probes read a model in eval mode; this attention call applies dropout")
    keys, values = call.keys_and_values()
    batch, heads, num_queries, _ = call.q.shape
    if (not needs_weights and len(rows) and 2 * len(rows) >= num_queries
            and fused.applies(call.q, call.attn_mask, call.is_causal)):
        # Every query row through the kernel (the few rows not read, prefix queries, cost less
        # there than a gather, a scatter and an SDPA call of their own); the rows read consumed.
        sums = fused.attention_rows(call.q, keys, values, call.scale_factor, where.num_prefix_keys,
                                    where.query_centres, where.key_centres, query_block)
        grid_max, total, shifted, distance, prefix_lse = (part[..., rows] for part in sums[1:])
        consume(AttentionBlock(layer, None, None, total, grid_max.unsqueeze(-1), shifted,
                               prefix_lse if where.num_prefix_keys else None, rows, where, distance))
        return sums.out
    out = call.q.new_empty(batch, heads, num_queries, values.shape[-1])
    dtype = call.q.dtype if call.q.dtype in (torch.float32, torch.float64) else torch.float32
    read = torch.zeros(num_queries, dtype=torch.bool, device=call.q.device)
    read[rows] = True
    others = torch.nonzero(~read).flatten()
    if len(others):
        if call.is_causal:  # a subset of rows cannot take is_causal: read every row here instead
            rows = torch.arange(num_queries, device=call.q.device)
        else:
            mask = call.attn_mask
            if mask is not None and mask.dim() >= 2 and mask.shape[-2] == num_queries:
                mask = mask[..., others, :]
            out[..., others, :] = original(call.q[..., others, :], call.k, call.v, attn_mask=mask,
                                           scale=call.scale, enable_gqa=call.enable_gqa)
    prefix = where.num_prefix_keys
    if not needs_weights and len(rows) and fused.applies(call.q, call.attn_mask, call.is_causal):  # a few rows read
        sums = fused.attention_rows(call.q[..., rows, :], keys, values, call.scale_factor, prefix,
                                    where.query_centres[rows], where.key_centres, query_block)
        out[..., rows, :] = sums.out
        consume(AttentionBlock(layer, None, None, sums.grid_total, sums.grid_max.unsqueeze(-1), sums.weighted_shifted,
                               sums.prefix_lse if prefix else None, rows, where, sums.weighted_distance))
        return out
    value_grid, value_prefix = values[..., prefix:, :].to(dtype), values[..., :prefix, :].to(dtype)
    block = query_block or default_query_block(batch, heads, call.num_keys, call.q.device)
    for start in range(0, len(rows), block):
        block_rows = rows[start:start + block]
        pieces, numerator = softmax_pieces(layer, call.logits(block_rows).to(dtype), where, block_rows, value_grid)
        consume(pieces)
        # softmax @ v = exp(m - lse) * (w @ v_grid) + exp(s_prefix - lse) @ v_prefix
        log_total = pieces.log_total.unsqueeze(-1)
        result = (pieces.grid_max - log_total).exp() * numerator
        if prefix:
            result = result + (pieces.logits[..., :prefix] - log_total).exp() @ value_prefix
        out[..., block_rows, :] = result.to(out.dtype)
    return out


@contextlib.contextmanager
def read_attention(layers: list[AttentionLayer], consume: Consumer, geometry: TokenGeometry,
                   query_tokens: torch.Tensor | None = None, query_block: int | None = None,
                   needs_weights: bool = True) -> Iterator[None]:
    """While active, each forward of `layers[l].module` answers its attention call here and
    hands `consume` the blocks of the query rows read: every grid token, or the tokens
    `query_tokens`. With `needs_weights=False` the consumer promises to read only the blocks'
    sums (no `logits`, `grid_weights`), which lets the fused kernel answer. Everything is
    restored on exit."""
    keep_block_memory()
    original = F.scaled_dot_product_attention
    current: list[AttentionLayer] = []
    geometries: dict[tuple, CallGeometry] = {}  # per adapter's geometry key: distances computed once

    def sdpa(*args, **kwargs) -> torch.Tensor:
        if not current:  # an attention call outside the layers read
            return original(*args, **kwargs)
        layer = current[-1]
        call = SdpaCall.of(*args, **kwargs)
        key = layer.adapter.geometry_key(call)
        if key not in geometries:
            geometries[key] = layer.adapter.call_geometry(call, geometry)
        where = geometries[key]
        if query_tokens is None:
            rows = where.grid_rows()
        else:
            wanted = query_tokens.to(where.query_tokens.device)
            rows = torch.nonzero(torch.isin(where.query_tokens, wanted)).flatten()
        return attend(layer.index, call, where, rows, consume, query_block, original, needs_weights)

    def enter(layer: AttentionLayer):
        return lambda module, args: current.append(layer)

    def leave(module, args, output):
        current.pop()

    with contextlib.ExitStack() as stack:
        for layer in layers:
            stack.enter_context(layer.adapter.reading())
            stack.callback(layer.module.register_forward_pre_hook(enter(layer)).remove)
            stack.callback(layer.module.register_forward_hook(leave).remove)
        F.scaled_dot_product_attention = sdpa
        stack.callback(setattr, F, "scaled_dot_product_attention", original)
        yield

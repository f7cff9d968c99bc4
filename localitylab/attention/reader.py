"""Read a model's attention as it runs: the logits of every readable layer, streamed over
blocks of query rows, so no layer's N x N map ever exists in memory (a PiT on a 224 x 224
image has 50,177 tokens: one full fp32 map of one layer would be 40 GB).

Forward pre-hooks on each attention module ask its adapter for q and k as the module forms
them and hand `consume(layer, rows, logits)` one block of rows at a time. The module's own
forward is left alone, so the model's outputs are unchanged.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn

from localitylab.attention.adapters import AttentionAdapter, adapter_for

# The default query block holds at most this many attention logits (batch x heads x rows x
# keys), a few such temporaries per block; memory grows with N x block. On a CPU 4 MiB blocks
# stay in cache: 2.5-3.4x faster than 64 MiB ones (benchmarks/RESULTS.md). A GPU streams
# large blocks at full bandwidth and pays per kernel launch, so it keeps 64 MiB ones.
BLOCK_ELEMENTS = {"cpu": 2**20, "cuda": 2**24}

# consume(layer, rows, logits): rows are token indices (prefix included); logits are
# (B, heads, len(rows), N_keys), masked keys at -inf.
Consumer = Callable[[int, torch.Tensor, torch.Tensor], None]


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


def attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """The readable attention modules of `model`, in the order the forward runs them."""
    layers = []
    for name, module in model.named_modules():
        adapter = adapter_for(module)
        if adapter is not None:
            layers.append(AttentionLayer(len(layers), name, module, adapter))
    return layers


def unread_attention_classes(model: nn.Module) -> list[str]:
    """Class names of modules that look like attention but that no adapter reads."""
    found = Counter(type(m).__name__ for m in model.modules()
                    if "attention" in type(m).__name__.lower() and adapter_for(m) is None
                    and not any(adapter_for(child) for child in m.modules()))
    return [f"{name} (x{count})" if count > 1 else name for name, count in sorted(found.items())]


def default_query_block(batch: int, heads: int, tokens: int, device: torch.device | str = "cpu") -> int:
    elements = BLOCK_ELEMENTS.get(torch.device(device).type, BLOCK_ELEMENTS["cuda"])
    return max(1, elements // max(1, batch * heads * tokens))


@contextlib.contextmanager
def read_attention(layers: list[AttentionLayer], consume: Consumer, num_prefix_tokens: int,
                   query_tokens: torch.Tensor | None = None, query_block: int | None = None) -> Iterator[None]:
    """While active, every forward of `layers[l].module` also calls `consume(l, rows, logits)`
    for blocks of query rows: all non-prefix tokens, or `query_tokens`. The hooks are removed
    on exit, error or not; the modules' own computation is untouched."""

    def make_hook(layer: AttentionLayer):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            attended = layer.adapter.query_keys(args, kwargs)
            batch, heads, tokens = attended.q.shape[:3]
            device = attended.q.device
            rows = (torch.arange(num_prefix_tokens, tokens, device=device) if query_tokens is None
                    else query_tokens.to(device))
            block = query_block or default_query_block(batch, heads, attended.num_keys, device)
            for start in range(0, len(rows), block):
                block_rows = rows[start:start + block]
                consume(layer.index, block_rows, attended.scores(block_rows))
            return None

        return hook

    handles = []
    try:
        for layer in layers:
            handles.append(layer.module.register_forward_pre_hook(make_hook(layer), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()

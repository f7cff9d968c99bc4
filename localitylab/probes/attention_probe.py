"""The base of the probes that read attention (attention-distance, attention-maps): it owns
the forward pass, the hooks' lifetime (`localitylab.attention.read_attention`) and the
per-image collection; a subclass says which query rows it reads and what it reduces from
each block of their logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from localitylab.attention import (AttentionBlock, AttentionLayer, CallGeometry, TokenGeometry, attention_layers,
                                   read_attention, unread_attention_classes)
from localitylab.probes.base import Probe, ProbeInputs
from localitylab.probes.target import ProbeTarget


def no_attention_reason(target: ProbeTarget, probe: str = "the attention probes") -> str | None:
    """Why `probe` (an attention probe) cannot read this model, or None if it can."""
    layers = attention_layers(target.model)
    if not layers:
        unread = unread_attention_classes(target.model)
        if unread:
            return (f"attention modules {', '.join(unread)} found, but no attention adapter reads them: "
                    f"{probe} does not apply")
        return f"no attention modules (a ConvNet or another kind of mixing): {probe} does not apply"
    side = target.data.img_size
    if target.info.grid_for((side, side)) is None and any(layer.adapter.needs_model_grid for layer in layers):
        found = sorted({type(layer.module).__name__ for layer in layers if layer.adapter.needs_model_grid})
        why = target.info.layout_note or "the model has no patch_embed token grid"
        return f"attention modules {', '.join(found)} found, but their tokens cannot be placed on the image: {why}"
    return None


@dataclass
class LayerValues:
    """Per-image values of one layer: {name: (n_images, heads, rows)} (rows = 1 when averaged),
    the grid its tokens live on (a stage's, or the model's) and what the adapter said about it."""

    layer: AttentionLayer
    values: dict[str, torch.Tensor]
    grid: TokenGeometry | None = None
    note: str = ""
    class_query: bool = False


# reduce(block, first_image) -> {name: (R, heads, block rows) values} for one block of query rows;
# first_image is the index, among the probe's images, of the forward batch's first image.
Reduction = Callable[[AttentionBlock, int], dict[str, torch.Tensor]]


class AttentionProbe(Probe):
    """Subclasses set `per_query` (keep each query row apart, or average over them), choose
    the query rows (`query_tokens`) and pass `collect` the reduction of one block of rows."""

    applies_to = "transformers whose attention an adapter reads (pit-*, vit-*/P, timm's ViT families, dit-*/P)"
    per_query: ClassVar[bool] = False
    # Whether `reduce` reads the blocks' weights or logits; a probe that reads only their sums
    # lets the reader answer from the fused kernel (localitylab.attention.fused).
    needs_weights: ClassVar[bool] = True
    on_denoiser = "per-level"

    def not_applicable(self, target: ProbeTarget) -> str | None:
        return super().not_applicable(target) or no_attention_reason(target, self.name)

    def query_tokens(self, inputs: ProbeInputs) -> torch.Tensor | None:
        """Token indices (prefix included) of the queries read; None: every non-prefix token."""
        return None

    def query_block(self, inputs: ProbeInputs) -> int | None:
        return None

    @torch.no_grad()
    def collect(self, inputs: ProbeInputs, reduce: Reduction) -> list[LayerValues]:
        """Run the model over the images once and reduce every readable layer's attention.

        Returns, per layer the forward reached, float64 (n_images, heads, Q) values: Q = the
        number of query tokens with `per_query`, else 1 (the mean over the query rows read
        for that image: a layer on a coarser grid, or in windows, has its own count).
        """
        target = inputs.target
        geometry = target.geometry
        layers = attention_layers(target.model)
        queries = self.query_tokens(inputs)
        n_rows = len(queries) if queries is not None else 1
        slot_of = {int(t): s for s, t in enumerate(queries.tolist())} if queries is not None else None
        collected: dict[int, dict[str, list[torch.Tensor]]] = {}
        in_batch: dict[int, dict[str, torch.Tensor]] = {}
        counts: dict[int, torch.Tensor] = {}  # query rows read per image of the batch, per layer
        seen: dict[int, CallGeometry] = {}
        batch_of: list = []

        def consume(block: AttentionBlock) -> None:
            batch = batch_of[0]
            seen.setdefault(block.layer, block.where)
            buffers = in_batch.setdefault(block.layer, {})
            per_image = block.images.new_zeros(len(batch), dtype=torch.float64)
            counts[block.layer] = counts.get(block.layer, per_image) + per_image.index_add(
                0, block.images, torch.full((len(block.images),), float(len(block.rows)), dtype=torch.float64,
                                            device=per_image.device))
            for name, values in reduce(block, batch.start).items():
                values = values.double()
                if len(values) != len(batch) or not torch.equal(block.images, torch.arange(len(batch), device=block.images.device)):
                    values = values.new_zeros(len(batch), *values.shape[1:]).index_add_(0, block.images, values)
                if name not in buffers:
                    buffers[name] = values.new_zeros(*values.shape[:2], n_rows)
                if self.per_query:
                    buffers[name][..., [slot_of[int(t)] for t in block.query_tokens.tolist()]] += values
                else:
                    buffers[name] += values.sum(dim=2, keepdim=True)

        with read_attention(layers, consume, geometry, query_tokens=queries, query_block=self.query_block(inputs),
                            needs_weights=self.needs_weights):
            for batch in inputs.batches():
                batch_of[:] = [batch]
                in_batch.clear()
                counts.clear()
                target.model(*batch.model_args())
                for layer, buffers in in_batch.items():
                    into = collected.setdefault(layer, {})
                    rows = counts[layer].clamp_min(1).view(-1, 1, 1)
                    for name, values in buffers.items():
                        into.setdefault(name, []).append((values if self.per_query else values / rows).cpu())
        by_index = {layer.index: layer for layer in layers}  # indices are block indices: gaps where a layer is unread
        return [LayerValues(by_index[index], {name: torch.cat(parts) for name, parts in collected[index].items()},
                            seen[index].grid, seen[index].note, seen[index].class_query)
                for index in sorted(collected)]

"""The base of the probes that read attention (attention-distance, attention-maps): it owns
the forward pass, the hooks' lifetime (`localitylab.attention.read_attention`) and the
per-image collection; a subclass says which query rows it reads and what it reduces from
each block of their logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from localitylab.attention import AttentionBlock, AttentionLayer, attention_layers, read_attention, unread_attention_classes
from localitylab.probes.base import Probe, ProbeInputs
from localitylab.probes.target import ProbeTarget


def no_attention_reason(target: ProbeTarget) -> str | None:
    """Why the attention probes cannot read this model, or None if they can."""
    if not attention_layers(target.model):
        unread = unread_attention_classes(target.model)
        if unread:
            return (f"attention modules {', '.join(unread)} found, but no attention adapter reads them: "
                    "attention probes do not apply")
        return "no timm or diffusers Attention modules (a ConvNet or another attention type): attention distance does not apply"
    if target.info.grid is None or target.info.patch_size is None:
        return "attention modules found, but the model has no patch_embed token grid to place tokens on"
    return None


@dataclass
class LayerValues:
    """Per-image values of one layer: {name: (n_images, heads, rows)} (rows = 1 when averaged)."""

    layer: AttentionLayer
    values: dict[str, torch.Tensor]


# reduce(block, first_image) -> {name: (R, heads, block rows) values} for one block of query rows;
# first_image is the index, among the probe's images, of the forward batch's first image.
Reduction = Callable[[AttentionBlock, int], dict[str, torch.Tensor]]


class AttentionProbe(Probe):
    """Subclasses set `per_query` (keep each query row apart, or average over them), choose
    the query rows (`query_tokens`) and pass `collect` the reduction of one block of rows."""

    applies_to = "transformers with timm Attention (pit-*, vit-*/P, timm ViT/DeiT) and DiTs (dit-*/P)"
    per_query: ClassVar[bool] = False
    on_denoiser = "per-level"

    def not_applicable(self, target: ProbeTarget) -> str | None:
        return super().not_applicable(target) or no_attention_reason(target)

    def query_tokens(self, inputs: ProbeInputs) -> torch.Tensor | None:
        """Token indices (prefix included) of the queries read; None: every non-prefix token."""
        return None

    def query_block(self, inputs: ProbeInputs) -> int | None:
        return None

    @torch.no_grad()
    def collect(self, inputs: ProbeInputs, reduce: Reduction) -> list[LayerValues]:
        """Run the model over the images once and reduce every readable layer's attention.

        Returns, per layer the forward reached, float64 (n_images, heads, Q) values: Q = the
        number of query tokens with `per_query`, else 1 (the mean over every query row).
        """
        target = inputs.target
        geometry = target.geometry
        layers = attention_layers(target.model)
        queries = self.query_tokens(inputs)
        n_rows = len(queries) if queries is not None else geometry.num_grid_tokens
        slot_of = {int(t): s for s, t in enumerate(queries.tolist())} if queries is not None else None
        collected: dict[int, dict[str, list[torch.Tensor]]] = {}
        in_batch: dict[int, dict[str, torch.Tensor]] = {}
        batch_of: list = []

        def consume(block: AttentionBlock) -> None:
            batch = batch_of[0]
            buffers = in_batch.setdefault(block.layer, {})
            for name, values in reduce(block, batch.start).items():
                values = values.double()
                if len(values) != len(batch) or not torch.equal(block.images, torch.arange(len(batch), device=block.images.device)):
                    values = values.new_zeros(len(batch), *values.shape[1:]).index_add_(0, block.images, values)
                if name not in buffers:
                    buffers[name] = values.new_zeros(*values.shape[:2], n_rows if self.per_query else 1)
                if self.per_query:
                    buffers[name][..., [slot_of[int(t)] for t in block.query_tokens.tolist()]] += values
                else:
                    buffers[name] += values.sum(dim=2, keepdim=True)

        with read_attention(layers, consume, geometry, query_tokens=queries, query_block=self.query_block(inputs)):
            for batch in inputs.batches():
                batch_of[:] = [batch]
                in_batch.clear()
                target.model(*batch.model_args())
                for layer, buffers in in_batch.items():
                    into = collected.setdefault(layer, {})
                    for name, values in buffers.items():
                        into.setdefault(name, []).append((values if self.per_query else values / n_rows).cpu())
        return [LayerValues(layers[index], {name: torch.cat(parts) for name, parts in collected[index].items()})
                for index in sorted(collected)]

"""attention-distance: how far, in input pixels, each head of each layer looks (docs/probes.md).

The ViT paper's "mean attention distance" (Dosovitskiy et al. 2021, Fig. 7; Raghu et al.
2021), made comparable across patch sizes by measuring in pixels between token centres and
by dividing by the same quantity for uniform attention (`locality_ratio`).

The attention is exactly the model's, read through its adapter (`localitylab.attention`)
over blocks of query rows inside the model's own forward pass (computed once, for the
model and the probe), so no layer's N x N map exists in memory. Per image, layer and
head: the mean over its queries of the attended distance, the prefix share and the
normalised entropy; the table's values are their means over images.

Distances are in the model's input coordinates: for a model trained on pixel-permuted
images that is the permuted grid the model sees.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import field_validator

from localitylab.attention import AttentionBlock, TokenGeometry, pixel_distances, unread_attention_layers
from localitylab.attention.compiled import compiled, weighted_distance
from localitylab.probes.attention_probe import AttentionProbe
from localitylab.probes.base import Measurements, ProbeInputs, SummaryColumn
from localitylab.plotting import probes as drawings
from localitylab.probes.registry import register_probe
from localitylab.probes.settings import option
from localitylab.settings import Settings

METRICS = ("mean_distance_px", "mean_distance_frac", "mean_distance_px_raw", "uniform_distance_px", "locality_ratio",
           "prefix_share", "entropy_norm")


# --- reduction of one block of rows -------------------------------------------------------------
def attention_row_values(probs: torch.Tensor, query_centres: torch.Tensor, key_centres: torch.Tensor,
                         num_prefix_tokens: int) -> dict[str, torch.Tensor]:
    """docs/probes.md's definitions, written out from the softmax, for one block of rows.

    probs: (B, heads, b, P + T) softmax rows; query_centres (b, 2) and key_centres (T, 2) in
    pixels. Returns (B, heads, b) values: the attended distance d of each row, its prefix
    share and its normalised entropy. The probe reduces the reader's blocks with
    `block_row_values`, which is checked against this one.
    """
    prefix_share = probs[..., :num_prefix_tokens].sum(dim=-1)
    grid_probs = probs[..., num_prefix_tokens:]
    renormalised = grid_probs / grid_probs.sum(dim=-1, keepdim=True)
    distances = pixel_distances(query_centres.double(), key_centres.double()).to(probs)  # (b, T)
    attended = (renormalised * distances).sum(dim=-1)
    num_keys = key_centres.shape[0]
    entropy = -torch.special.xlogy(renormalised, renormalised).sum(dim=-1)
    entropy = entropy / math.log(num_keys) if num_keys > 1 else torch.full_like(entropy, float("nan"))
    return {"distance": attended, "prefix": prefix_share, "entropy": entropy}


def block_row_values(block: AttentionBlock) -> dict[str, torch.Tensor]:
    """`attention_row_values` from the reader's softmax pieces, without forming the softmax:
    with w = exp(s - max_grid s) over the grid keys and Z = sum w, A' = w / Z, so the
    distance is sum(w d) / Z (one pass over the block, the distances computed in place),
    the entropy comes from Z and sum w (s - m) (`AttentionBlock.entropy`), the prefix share
    from two logsumexps. A block from the fused kernel brings sum(w d) with it.
    """
    if block.grid_distance is not None:
        weighted = block.grid_distance
    else:
        weights = block.grid_weights
        centres = block.query_centres.to(weights.dtype), block.where.key_centres.to(weights.dtype)
        weighted = compiled(weighted_distance, weights.shape[-1])(weights, *centres)
    attended = weighted / block.grid_total
    num_keys = block.where.key_centres.shape[0]
    entropy = block.entropy() / math.log(num_keys) if num_keys > 1 else torch.full_like(attended, float("nan"))
    prefix = block.prefix_share()
    # Without renormalising: sum over grid keys of A d = A'-distance times the grid's share.
    return {"distance": attended, "distance_raw": attended * (1 - prefix), "prefix": prefix, "entropy": entropy}


def add_distance_rows(out: Measurements, layer: int, values: dict[str, torch.Tensor], geometry: TokenGeometry,
                      n_images: int, note: str = "", class_query: bool = False) -> None:
    """The table's rows of one layer from per-image means over queries, values[...] being
    (n_images, heads): first the mean over heads (head empty), then each head. `geometry` is
    the grid the layer's tokens live on (the uniform reference and the image side); `note`
    what the adapter said about the layer. A class-attention layer (its only query is a
    prefix token, which has no position) has no distance: those rows say so."""
    uniform = geometry.uniform_distance_px()
    side = geometry.image_side
    heads = values["distance"].shape[1]

    def with_note(text: str = "") -> str:
        return "; ".join(part for part in (note, text) if part)

    no_distance = with_note("the query is the class token, which has no position: no distance")
    for head in (None, *range(heads)):
        def of(key: str) -> torch.Tensor:
            return values[key].mean(dim=1) if head is None else values[key][:, head]

        def distance_row(metric: str, value: torch.Tensor, text: str = "") -> None:
            if class_query:
                out.single(metric, None, layer, head, note=no_distance, n_images=n_images)
            else:
                out.per_image(metric, value, layer, head, note=with_note(text))

        distance = of("distance")
        distance_row("mean_distance_px", distance)
        distance_row("mean_distance_frac", distance / side)
        distance_row("mean_distance_px_raw", of("distance_raw"),
                     "sum over grid keys of A d, not renormalised: the public notebooks' convention")
        out.single("uniform_distance_px", uniform, layer, head, note=with_note("uniform attention: geometry alone"),
                   n_images=0)
        distance_row("locality_ratio", distance / uniform if uniform > 0 else distance * float("nan"))
        out.per_image("prefix_share", of("prefix"), layer, head, note=with_note())
        out.per_image("entropy_norm", of("entropy"), layer, head, note=with_note())


# --- the probe --------------------------------------------------------------------------------
class AttentionDistanceOptions(Settings):
    query_block: int | None = option(None, "attention-distance: query rows per block; default: ~4 MiB of logits "
                                     "(64 MiB on a GPU), at least 64 rows within 64 MiB.")

    @field_validator("query_block", mode="before")
    @classmethod
    def _positive(cls, value: object) -> int | None:
        if value is None:
            return None
        try:
            block = int(value)
            if isinstance(value, bool) or block != float(value) or block < 1:
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(f"query_block must be a positive integer (query rows per block), got {value!r}") from None
        return block


@register_probe
class AttentionDistance(AttentionProbe):
    name = "attention-distance"
    summary = "Mean attention distance per head and layer, in pixels and relative to uniform attention"
    Options = AttentionDistanceOptions
    needs_weights = False
    summary_columns = (
        SummaryColumn("ratio_first", "locality ratio, first block",
                      "mean over heads of mean attention distance / uniform distance, block 0 (below 1 = local)",
                      "locality_ratio", layer="first", better="low",
                      sentence="attends most locally in its first block (lowest locality ratio)"),
        SummaryColumn("ratio_last", "locality ratio, last block", "the same for the last block", "locality_ratio",
                      layer="last", better="low"),
    )

    def query_block(self, inputs: ProbeInputs) -> int | None:
        return inputs.options.query_block

    def measure(self, inputs: ProbeInputs, out: Measurements) -> None:
        geometry = inputs.target.geometry
        for layer in self.collect(inputs, lambda block, first_image: block_row_values(block)):
            values = {key: layer.values[key][..., 0] for key in ("distance", "distance_raw", "prefix", "entropy")}
            add_distance_rows(out, layer.layer.index, values, layer.grid or geometry, inputs.n_images, layer.note,
                              layer.class_query)
        for unread in unread_attention_layers(inputs.target.model):  # one row each: what it is, why it is not read
            why = f": {unread.why}" if unread.why else ""
            out.single("mean_distance_px", None, unread.index, note=f"{unread.class_name} is not read{why}",
                       n_images=0)

    def plot(self, tables: list[pd.DataFrame], out_dir: Path) -> list[Path]:
        return drawings.plot_attention_distance(tables, out_dir)





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
from localitylab.probes.base import Measurements, ProbeInputs, SummaryColumn, overlay
from localitylab.probes.registry import register_probe
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
    # Query rows per block; default: ~4 MiB of logits (64 MiB on a GPU), at least 64 rows within 64 MiB.
    query_block: int | None = None

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
        """ViT-paper view: a dot per head against depth, and the locality ratio per layer."""
        import matplotlib.pyplot as plt

        from localitylab.plotting import apply_style, errorbar, model_colours, model_markers, save_figure

        paths = plot_noise_levels(tables, out_dir)
        frame = overlay(tables)
        frame = None if frame is None else frame[~frame["setting"].str.startswith("t=")]
        if frame is not None and frame.empty:
            frame = None
        if frame is None:
            return paths
        apply_style()
        models = sorted(frame["model"].unique())
        colours, markers = model_colours(models), model_markers(models)
        offsets = np.linspace(-0.15, 0.15, len(models)) if len(models) > 1 else [0.0]
        fig, (ax_dist, ax_ratio) = plt.subplots(1, 2, figsize=(11, 4.2))
        for offset, model in zip(offsets, models):
            rows = frame[frame["model"] == model]
            heads = rows[rows["head"].notna()]
            dist = heads[heads["metric"] == "mean_distance_px"]
            ax_dist.scatter(dist["layer"].astype(float) + offset, dist["value"], color=colours[model],
                            marker=markers[model], s=22, alpha=0.85, label=model)
            uniform = rows.loc[rows["metric"] == "uniform_distance_px", "value"]
            if len(uniform):
                ax_dist.axhline(float(uniform.iloc[0]), color=colours[model], linestyle=":", linewidth=1)
            ratio = heads[heads["metric"] == "locality_ratio"]
            ax_ratio.scatter(ratio["layer"].astype(float) + offset, ratio["value"], color=colours[model],
                             marker=markers[model], s=12, alpha=0.35)
            whole = rows[(rows["metric"] == "locality_ratio") & rows["head"].isna()].sort_values("layer")
            if whole.empty:  # a table from before head means were written
                whole = ratio.groupby("layer", as_index=False)["value"].mean().assign(ci_low=np.nan, ci_high=np.nan)
            errorbar(ax_ratio, whole["layer"].astype(float) + offset, whole, color=colours[model],
                     marker=markers[model], label=model)
        ax_dist.set(xlabel="layer (block)", ylabel="mean attention distance (pixels)",
                    title="Attention distance per head")
        ax_ratio.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax_ratio.set(xlabel="layer (block)", ylabel="distance / uniform distance",
                     title="Locality ratio, mean over heads (bars: 95% CI)")
        for ax in (ax_dist, ax_ratio):
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax_dist.legend(fontsize="small", title="dotted: uniform attention", title_fontsize="x-small", loc="best",
                       framealpha=0.8)
        return [save_figure(fig, Path(out_dir) / "attention-distance.png"), *paths]


def noise_level_frame(tables: list[pd.DataFrame]) -> pd.DataFrame | None:
    """A denoiser's locality ratio (the mean over heads, with its interval) per model, layer
    and noise level: columns model, layer, timestep, value, ci_low, ci_high; None when no
    table has noise levels."""
    frame = overlay(tables, lambda f: (f["metric"] == "locality_ratio") & f["head"].isna()
                    & f["setting"].str.match(r"^t=\d+$"))
    if frame is None:
        return None
    frame = frame.assign(timestep=frame["setting"].str[2:].astype(int), layer=frame["layer"].astype(int))
    return frame[["model", "layer", "timestep", "value", "ci_low", "ci_high"]].sort_values(["model", "layer", "timestep"])


def plot_noise_levels(tables: list[pd.DataFrame], out_dir: Path) -> list[Path]:
    """Locality ratio against the noise level, one panel per layer, models overlaid."""
    import matplotlib.pyplot as plt

    from localitylab.plotting import apply_style, errorbar, model_colours, model_markers, save_figure

    frame = noise_level_frame(tables)
    if frame is None:
        return []
    apply_style()
    layers = sorted(frame["layer"].unique())
    models = sorted(frame["model"].unique())
    colours, markers = model_colours(models), model_markers(models)
    columns = min(len(layers), 6)
    rows = -(-len(layers) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns + 0.6, 2.4 * rows + 0.8), squeeze=False,
                             sharex=True, sharey=True, layout="constrained")
    for ax, layer in zip(axes.flat, layers):
        for model in models:
            line = frame[(frame["model"] == model) & (frame["layer"] == layer)]
            errorbar(ax, line["timestep"], line, color=colours[model], marker=markers[model], label=model)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("symlog", linthresh=10)
        ax.set_title(f"layer {layer}", fontsize="small")
    for ax in axes.flat[len(layers):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("locality ratio")
    for ax in axes[-1]:
        ax.set_xlabel("timestep t (noise level)")
    axes.flat[0].legend(fontsize="x-small", loc="best", framealpha=0.8)
    fig.suptitle("Denoiser attention: distance / uniform distance against noise, mean over heads "
                 "(1 = no preference; bars: 95% CI)",
                 fontsize="medium")
    return [save_figure(fig, Path(out_dir) / "attention-distance-noise.png")]

"""attention-maps: where chosen query pixels attend, layer by layer, drawn over the image.

Options: `query`, pixel coordinates 'row,col' of the model's input ('r,c;r,c' for several;
default the image centre), and `per_head` (also draw every head, not only their mean). A
query pixel stands for the token whose patch contains it. The attention comes from the
same hooks as attention-distance (`streamed_attention`), restricted to the query rows.

Table rows, per query (`setting` = 'query=r,c'), layer and head (head empty: the mean over
heads), averaged over the probe's images, with A' the attention renormalised over the
non-prefix keys as in PROBES.md:

- `query_distance_px`: sum_k A'[q,k] * |c_q - c_k|, the attended distance of this query;
- `uniform_query_distance_px` (layer and head empty): the same for uniform attention, the
  geometry-only baseline for this query position;
- `neighbourhood_mass`: A' mass on the 3x3 tokens around the query token (itself
  included), against `uniform_neighbourhood_mass` = their count / #tokens (layer, head empty);
- `prefix_share`: the attention the query gives the [cls] / register tokens.

Figures (`artifacts`): per query, a grid of the first few test images by layer, each map
(head mean; one row per head with `per_head`) over what the model sees, the query marked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from localitylab.errors import UserError
from localitylab.probes.attention_distance import (TokenGeometry, attention_modules, check_token_count,
                                                   no_attention_reason, pixel_distances, prepared_batches,
                                                   streamed_attention)
from localitylab.probes.base import Probe, ProbeContext, Row
from localitylab.probes.registry import register_probe
from localitylab.probes.target import ProbeTarget

FIGURE_IMAGES = 4  # images drawn per query (2 when every head is drawn)


def parse_queries(value: Any, geometry: TokenGeometry) -> list[tuple[int, int]]:
    """'r,c' or 'r,c;r,c' (or (r, c) pairs) -> pixel coordinates inside the image."""
    height, width = geometry.image_shape
    if value is None:
        return [(height // 2, width // 2)]
    valid = (f"query must be 'row,col' pixel coordinates (';' between several) with 0 <= row < {height} "
             f"and 0 <= col < {width}, got {value!r}")
    if isinstance(value, str):
        parts = [part.split(",") for part in value.split(";")]
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        parts = [list(value)]  # --opt query=4,4 arrives as a tuple
    elif isinstance(value, (tuple, list)):
        parts = [list(pair) if isinstance(pair, (tuple, list)) else [pair] for pair in value]
    else:
        raise UserError(valid)
    queries = []
    for part in parts:
        try:
            if len(part) != 2:
                raise ValueError
            row, col = (int(str(v).strip()) for v in part)
        except ValueError:
            raise UserError(valid) from None
        if not (0 <= row < height and 0 <= col < width):
            raise UserError(valid)
        if (row, col) not in queries:
            queries.append((row, col))
    return queries


def parse_flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise UserError(f"{name} must be true or false, got {value!r}")


@dataclass
class QueryAttention:
    """Per-head sums over images for each (layer, query), and the maps of the first images."""

    distance: torch.Tensor  # (layers, heads, queries) float64 sums
    neighbourhood: torch.Tensor
    prefix: torch.Tensor
    n_images: int
    maps: torch.Tensor | None  # (images kept, layers, heads, queries, grid_h, grid_w) A'


@torch.no_grad()
def collect_query_attention(target: ProbeTarget, images: torch.Tensor, queries: list[tuple[int, int]],
                            batch_size: int, keep_maps: int = 0) -> QueryAttention:
    """Run the model over uint8 `images` and reduce the attention of the query tokens."""
    geometry = TokenGeometry.of(target)
    modules = attention_modules(target.model)
    # Queries in one patch share a token: each token is a slot, computed once.
    query_tokens = [geometry.token_of_pixel(r, c) for r, c in queries]
    slot_tokens = sorted(set(query_tokens))
    slot_of = {token: slot for slot, token in enumerate(slot_tokens)}
    centres = geometry.centres(target.device)
    slot_centres = centres[torch.tensor(slot_tokens, device=target.device) - geometry.num_prefix_tokens]
    # The 3x3 token window around each slot's token (Chebyshev distance <= 1 token).
    steps = (centres[None, :, :] - slot_centres[:, None, :]).abs().amax(dim=-1) / geometry.patch_size
    window = (steps <= 1.0 + 1e-6).to(centres.dtype)  # (slots, T)
    slot_distances = pixel_distances(slot_centres, centres)
    heads = [m.num_heads for m in modules]
    sums = {key: torch.zeros(len(modules), max(heads), len(slot_tokens), dtype=torch.float64)
            for key in ("distance", "neighbourhood", "prefix")}
    kept = [torch.zeros(keep_maps, n_heads, len(slot_tokens), geometry.num_grid_tokens) for n_heads in heads]
    seen = {"images": 0}

    def consume(layer: int, rows: torch.Tensor, probs: torch.Tensor) -> None:
        check_token_count(probs, geometry)
        slots = [slot_of[token] for token in rows.tolist()]  # distinct: each slot once per block
        n_heads = heads[layer]
        prefix = probs[..., :geometry.num_prefix_tokens].sum(dim=-1)  # (B, heads, rows)
        grid = probs[..., geometry.num_prefix_tokens:]
        grid = grid / grid.sum(dim=-1, keepdim=True)  # A', (B, heads, rows, T)
        for key, weights in (("distance", slot_distances), ("neighbourhood", window)):
            per_row = (grid * weights[slots].to(grid)).sum(dim=-1)  # (B, heads, rows)
            sums[key][layer, :n_heads, slots] += per_row.double().sum(0).cpu()
        sums["prefix"][layer, :n_heads, slots] += prefix.double().sum(0).cpu()
        wanted = keep_maps - seen["images"]
        if wanted > 0:
            kept[layer][seen["images"]:seen["images"] + len(grid[:wanted]), :, slots] = grid[:wanted].float().cpu()

    with streamed_attention(modules, consume, geometry.num_prefix_tokens,
                            query_tokens=torch.tensor(slot_tokens, device=target.device)):
        for batch in prepared_batches(target, images, batch_size):
            target.model(batch)
            seen["images"] += len(batch)
    per_query = [slot_of[token] for token in query_tokens]
    maps = None
    if keep_maps:
        # (images, layers, heads, queries, grid_h, grid_w); drawing assumes equal head counts
        stacked = torch.stack(kept, dim=1)[:min(keep_maps, len(images)), :, :, per_query]
        maps = stacked.reshape(*stacked.shape[:4], *geometry.grid)
    return QueryAttention(sums["distance"][..., per_query], sums["neighbourhood"][..., per_query],
                          sums["prefix"][..., per_query], len(images), maps)


@register_probe
class AttentionMaps(Probe):
    name = "attention-maps"
    summary = "Attention of chosen query pixels in every layer, over test images; attended distance per query"
    applies_to = "transformers with timm Attention (pit-*, vit-*/P, timm ViT/DeiT)"
    option_names = ("query", "per_head")

    def not_applicable(self, target: ProbeTarget) -> str | None:
        return no_attention_reason(target)

    def check_options(self, options: dict[str, Any]) -> None:
        parse_flag(options.get("per_head", False), "per_head")
        if "query" in options:  # the form here; whether the pixels lie inside the image, in check()
            try:
                parse_queries(options["query"], TokenGeometry((1 << 30, 1 << 30), 1, 0))
            except UserError:
                raise UserError(f"query must be 'row,col' pixel coordinates (';' between several), "
                                f"got {options['query']!r}") from None

    def check(self, target: ProbeTarget, context: ProbeContext) -> None:
        self.check_options(context.options)
        parse_queries(context.option("query", None), TokenGeometry.of(target))

    def measure(self, target: ProbeTarget, context: ProbeContext) -> list[Row]:
        geometry = TokenGeometry.of(target)
        queries = parse_queries(context.option("query", None), geometry)
        parse_flag(context.option("per_head", False), "per_head")  # fail before the work, not after
        result = collect_query_attention(target, context.images, queries, context.batch_size)
        heads = [m.num_heads for m in attention_modules(target.model)]
        centres = geometry.centres(dtype=torch.float64)
        count = result.n_images
        rows: list[Row] = []
        for q, (row, col) in enumerate(queries):
            setting = f"query={row},{col}"
            token_centre = centres[geometry.token_of_pixel(row, col) - geometry.num_prefix_tokens]
            offsets = centres - token_centre
            uniform = float(offsets.norm(dim=1).mean())
            in_window = int(((offsets.abs().amax(dim=1) / geometry.patch_size) <= 1.0 + 1e-6).sum())
            rows.append(Row("uniform_query_distance_px", uniform, setting=setting))
            rows.append(Row("uniform_neighbourhood_mass", in_window / geometry.num_grid_tokens, setting=setting))
            for layer, n_heads in enumerate(heads):
                values = {"query_distance_px": result.distance, "neighbourhood_mass": result.neighbourhood,
                          "prefix_share": result.prefix}
                for metric, sums in values.items():
                    per_head = sums[layer, :n_heads, q] / count
                    rows += [Row(metric, float(v), layer, head, setting) for head, v in enumerate(per_head)]
                    rows.append(Row(metric, float(per_head.mean()), layer, None, setting))
        return rows

    def artifacts(self, target: ProbeTarget, context: ProbeContext, out_dir: Path) -> list[Path]:
        geometry = TokenGeometry.of(target)
        queries = parse_queries(context.option("query", None), geometry)
        per_head = parse_flag(context.option("per_head", False), "per_head")
        n_images = min(FIGURE_IMAGES, context.n_images)
        result = collect_query_attention(target, context.images[:n_images], queries, context.batch_size, n_images)
        pictures = _what_the_model_sees(target, context.images[:n_images])
        paths = []
        for q, (row, col) in enumerate(queries):
            stem = f"attention-maps-q{row}-{col}"
            paths.append(_draw(result.maps[:, :, :, q].mean(dim=2, keepdim=True), pictures, (row, col), geometry,
                               target.display_name, Path(out_dir) / f"{stem}.png", head_labels=None))
            if per_head:
                few = min(2, n_images)
                paths.append(_draw(result.maps[:few, :, :, q], pictures[:few], (row, col), geometry,
                                   target.display_name, Path(out_dir) / f"{stem}-heads.png",
                                   head_labels=list(range(result.maps.shape[2]))))
        return paths

    def plot(self, tables: list[pd.DataFrame], out_dir: Path) -> list[Path]:
        """Attended distance (head mean) of each query against depth, models overlaid."""
        import matplotlib.pyplot as plt
        import seaborn as sns

        from localitylab.plotting import apply_style, model_colours, save_figure

        frame = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
        if frame.empty:
            return []
        frame = frame[(frame["metric"] == "query_distance_px") & frame["head"].isna() & frame["value"].notna()]
        if frame.empty:
            return []
        apply_style()
        frame = frame.assign(layer=frame["layer"].astype(float))
        fig, ax = plt.subplots(figsize=(6, 4))
        sns.lineplot(data=frame, x="layer", y="value", hue="model", style="setting", markers=True,
                     palette=model_colours(frame["model"]), ax=ax)
        ax.set(xlabel="layer (block)", ylabel="attended distance (pixels)", title="Attention distance of the query")
        ax.xaxis.get_major_locator().set_params(integer=True)
        return [save_figure(fig, Path(out_dir) / "attention-maps-distance.png")]


def _what_the_model_sees(target: ProbeTarget, images: torch.Tensor) -> np.ndarray:
    """uint8 images (N, H, W[, 3]) after the model's pixel permutation, for drawing."""
    if target.data.permutation is not None:
        from localitylab.data.permutation import permute_pixels

        images = permute_pixels(images, target.data.permutation.to(images.device))
    pictures = images.cpu().numpy()
    return pictures.transpose(0, 2, 3, 1) if pictures.shape[1] == 3 else pictures[:, 0]


def _draw(maps: torch.Tensor, pictures: np.ndarray, query: tuple[int, int], geometry: TokenGeometry,
          model_name: str, path: Path, head_labels: list[int] | None) -> Path:
    """maps: (images, layers, heads, grid_h, grid_w); one row per image and head."""
    import matplotlib.pyplot as plt

    from localitylab.plotting import apply_style, save_figure

    apply_style()
    n_images, n_layers, n_heads = maps.shape[:3]
    height, width = geometry.image_shape
    extent = (0, width, height, 0)
    n_rows = n_images * n_heads
    fig, axes = plt.subplots(n_rows, n_layers + 1, figsize=(1.7 * (n_layers + 1), 1.7 * n_rows + 0.4), squeeze=False)
    grey = pictures.ndim == 3
    for image in range(n_images):
        for head in range(n_heads):
            axes_row = axes[image * n_heads + head]
            axes_row[0].imshow(pictures[image], cmap="gray" if grey else None, extent=extent)
            label = f"image {image}" + (f"\nhead {head_labels[head]}" if head_labels is not None else "")
            axes_row[0].set_ylabel(label, fontsize="small")
            for layer in range(n_layers):
                ax = axes_row[layer + 1]
                ax.imshow(pictures[image], cmap="gray" if grey else None, extent=extent)
                ax.imshow(maps[image, layer, head].numpy(), cmap="inferno", alpha=0.65, extent=extent,
                          interpolation="nearest")
                if image == 0 and head == 0:
                    ax.set_title(f"layer {layer}", fontsize="small")
            for ax in axes_row:
                ax.plot(query[1] + 0.5, query[0] + 0.5, marker="x", color="cyan", markersize=7, mew=2)
                ax.set_xticks([])
                ax.set_yticks([])
    axes[0][0].set_title("input", fontsize="small")
    what = "per head" if head_labels is not None else "mean over heads"
    fig.suptitle(f"{model_name}: attention of pixel ({query[0]}, {query[1]}), {what}", fontsize="medium")
    return save_figure(fig, path)

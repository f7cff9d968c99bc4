"""attention-maps: where chosen query pixels look, layer by layer (docs/probes.md, the ViT paper's
attention-map figures made quantitative).

Options: `query`, pixel coordinates 'row,col' of the model's input ('r,c;r,c' for several;
default the image centre), and `per_head` (also draw every head, not only their mean). A
query pixel stands for the token whose patch contains it. The attention comes from the
same reader as attention-distance, restricted to the query rows, in one pass that also
keeps the maps of the first few images for the figures.

Table rows, per query (`setting` = 'query=r,c'), layer and head (head empty: the mean over
heads), averaged over the probe's images, with A' the attention renormalised over the
non-prefix keys as in docs/probes.md:

- `query_distance_px`: sum_k A'[q,k] * |c_q - c_k|, the attended distance of this query;
- `uniform_query_distance_px` (layer and head empty): the same for uniform attention, the
  geometry-only baseline for this query position;
- `neighbourhood_mass`: A' mass on the keys whose centres lie within `neighbourhood_px`
  pixels of the query's centre (itself included; default a quarter of the image side, the
  same disc in pixels whatever the patch size), against `uniform_neighbourhood_mass` =
  their count / #tokens (layer, head empty);
- `prefix_share`: the attention the query gives the [cls] / register tokens.

Figures: per query, a grid of the first few test images by layer, each map (head mean;
one row per head with `per_head`) over what the model sees, the query marked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import field_validator

from localitylab.attention import AttentionBlock, TokenGeometry, attention_layers, pixel_distances
from localitylab.errors import UserError
from localitylab.probes.attention_probe import AttentionProbe
from localitylab.probes.base import Measurements, ProbeInputs
from localitylab.plotting import probes as drawings
from localitylab.probes.registry import register_probe
from localitylab.probes.target import ProbeTarget
from localitylab.probes.settings import option
from localitylab.settings import Settings

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
        parts = [list(value)]  # query=4,4 typed on a command line arrives as a tuple
    elif isinstance(value, (tuple, list)):
        parts = [list(pair) if isinstance(pair, (tuple, list)) else [pair] for pair in value]
    else:
        raise UserError(valid, setting="query")
    queries = []
    for part in parts:
        try:
            if len(part) != 2:
                raise ValueError
            row, col = (int(str(v).strip()) for v in part)
        except ValueError:
            raise UserError(valid, setting="query") from None
        if not (0 <= row < height and 0 <= col < width):
            raise UserError(valid, setting="query")
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
    raise ValueError(f"{name} must be true or false, got {value!r}")


class AttentionMapsOptions(Settings):
    query: Any = option(None, "attention-maps: query pixels 'row,col' (';' between several); default: the "
                        "image centre.")
    per_head: bool = option(False, "attention-maps: draw every head, not only their mean.")
    neighbourhood_px: float | None = option(None, "attention-maps: radius of the neighbourhood in pixels; "
                                            "default: image side / 4.")

    @field_validator("neighbourhood_px", mode="before")
    @classmethod
    def _radius(cls, value: Any) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"neighbourhood_px must be a number of pixels >= 0, got {value!r}")
        return float(value)

    @field_validator("query", mode="before")
    @classmethod
    def _form(cls, value: Any) -> Any:
        # The form here; whether the pixels lie inside the image, in AttentionMaps.check.
        if value is not None:
            try:
                parse_queries(value, TokenGeometry((1 << 30, 1 << 30), 1, 0))
            except UserError:
                raise ValueError(f"query must be 'row,col' pixel coordinates (';' between several), "
                                 f"got {value!r}") from None
        return value

    @field_validator("per_head", mode="before")
    @classmethod
    def _flag(cls, value: Any) -> bool:
        return parse_flag(value, "per_head")


@dataclass
class QueryMaps:
    """What the figures draw: the renormalised maps of the first images, per query."""

    queries: list[tuple[int, int]]
    maps: torch.Tensor  # (images, layers, heads, queries, grid_h, grid_w) A'
    pictures: np.ndarray  # the images as the model sees them (after its pixel permutation)
    per_head: bool


class QueryReduction:
    """Per query slot: attended distance, 3x3-token neighbourhood mass, prefix share; and the
    maps of the first `keep` images."""

    def __init__(self, geometry: TokenGeometry, slot_tokens: list[int], heads: dict[int, int], keep: int,
                 device: torch.device, radius: float):
        self.geometry = geometry
        self.slot_of = {token: slot for slot, token in enumerate(slot_tokens)}
        centres = geometry.centres(device)
        slot_centres = centres[torch.tensor(slot_tokens, device=device) - geometry.num_prefix_tokens]
        self.distances = pixel_distances(slot_centres, centres)  # (slots, T)
        self.window = (self.distances <= radius + 1e-6).to(centres.dtype)  # keys within `radius` pixels
        self.keep = keep
        self.maps = {layer: torch.zeros(keep, n_heads, len(slot_tokens), geometry.num_grid_tokens)
                     for layer, n_heads in heads.items()}  # by layer index

    def __call__(self, block: AttentionBlock, first_image: int) -> dict[str, torch.Tensor]:
        slots = [self.slot_of[token] for token in block.query_tokens.tolist()]  # distinct: each slot once per block
        grid = block.renormalised()  # A', (B, heads, rows, T)
        wanted = self.keep - first_image
        if wanted > 0:
            kept = grid[:wanted].float().cpu()
            self.maps[block.layer][first_image:first_image + len(kept), :, slots] = kept
        return {"distance": (grid * self.distances[slots].to(grid)).sum(dim=-1),
                "neighbourhood": (grid * self.window[slots].to(grid)).sum(dim=-1), "prefix": block.prefix_share()}


@register_probe
class AttentionMaps(AttentionProbe):
    name = "attention-maps"
    summary = "Attention of chosen query pixels in every layer, over test images; attended distance per query"
    Options = AttentionMapsOptions
    per_query = True

    def not_applicable(self, target: ProbeTarget) -> str | None:
        reason = super().not_applicable(target)
        if reason is None and target.info.grid_for((target.data.img_size,) * 2) is None:
            why = target.info.layout_note or "its tokens are on no single grid"
            return f"attention-maps draws each query's attention on the model's one token grid, and {why}"
        return reason

    def check(self, target: ProbeTarget, options: AttentionMapsOptions) -> None:
        parse_queries(options.query, target.geometry)

    def query_tokens(self, inputs: ProbeInputs) -> torch.Tensor:
        geometry = inputs.target.geometry
        tokens = {geometry.token_of_pixel(r, c) for r, c in parse_queries(inputs.options.query, geometry)}
        return torch.tensor(sorted(tokens))  # queries in one patch share a token, computed once

    def measure(self, inputs: ProbeInputs, out: Measurements) -> QueryMaps:
        target, geometry = inputs.target, inputs.target.geometry
        queries = parse_queries(inputs.options.query, geometry)
        slot_tokens = self.query_tokens(inputs).tolist()
        heads = {layer.index: layer.num_heads for layer in attention_layers(target.model)}
        keep = min(FIGURE_IMAGES, inputs.n_images)
        radius = inputs.options.neighbourhood_px
        radius = geometry.image_side / 4 if radius is None else radius
        reduction = QueryReduction(geometry, slot_tokens, heads, keep, target.device, radius)
        layers = self.collect(inputs, reduction)
        slot_of_query = [slot_tokens.index(geometry.token_of_pixel(r, c)) for r, c in queries]
        centres = geometry.centres(dtype=torch.float64)
        for (row, col), slot in zip(queries, slot_of_query):
            setting = f"query={row},{col}"
            token_centre = centres[geometry.token_of_pixel(row, col) - geometry.num_prefix_tokens]
            offsets = (centres - token_centre).norm(dim=1)
            within = f"keys within {radius:g} px of the query"
            out.single("uniform_query_distance_px", float(offsets.mean()), setting=setting,
                       note="uniform attention: geometry alone", n_images=0)
            out.single("uniform_neighbourhood_mass", int((offsets <= radius + 1e-6).sum()) / geometry.num_grid_tokens,
                       setting=setting, note=f"uniform attention on the {within}", n_images=0)
            for layer in layers:
                for metric, key in (("query_distance_px", "distance"), ("neighbourhood_mass", "neighbourhood"),
                                    ("prefix_share", "prefix")):
                    values = layer.values[key][..., slot]  # (images, heads)
                    note = within if key == "neighbourhood" else ""
                    out.per_image(metric, values.mean(dim=1), layer.layer.index, None, setting, note)
                    for head in range(values.shape[1]):
                        out.per_image(metric, values[:, head], layer.layer.index, head, setting, note)
        read = {layer.layer.index for layer in layers}
        for layer in attention_layers(target.model):
            if layer.index not in read:  # its queries are not the model's grid tokens
                out.single("query_distance_px", None, layer.index, note="attention on another token grid (a window, "
                           "a stage or a class query): no per-query map", n_images=0)
        drawn = [reduction.maps[index] for index in sorted(read)] or list(reduction.maps.values())[:1]
        maps = torch.stack(drawn, dim=1)[:keep, :, :, slot_of_query]  # drawing assumes equal head counts
        maps = maps.reshape(*maps.shape[:4], *geometry.grid)
        return QueryMaps(queries, maps, _what_the_model_sees(target, inputs.images[:keep]), inputs.options.per_head)

    def figures(self, target: ProbeTarget, drawing: QueryMaps, out_dir: Path) -> list[Path]:
        return drawings.attention_maps_figures(target, drawing, out_dir)

    def plot(self, tables: list[pd.DataFrame], out_dir: Path) -> list[Path]:
        return drawings.plot_attention_maps(tables, out_dir)


def _what_the_model_sees(target: ProbeTarget, images: torch.Tensor) -> np.ndarray:
    """uint8 images (N, H, W[, 3]) after the model's pixel permutation, for drawing."""
    if target.data.permutation is not None:
        from localitylab.data.permutation import permute_pixels

        images = permute_pixels(images, target.data.permutation.to(images.device))
    pictures = images.cpu().numpy()
    return pictures.transpose(0, 2, 3, 1) if pictures.shape[1] == 3 else pictures[:, 0]



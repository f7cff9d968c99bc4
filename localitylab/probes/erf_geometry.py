"""What receptive-field differentiates and where: the feature maps of every layer, the
feature location at the image's centre (docs/probes.md, Geometry), the radius of the disc
that holds a share of a map's mass (`erf_rXX_px`, `attribution_r50_px`), and the continuous
measures: the share of the mass outside the location's own cell (`erf_outside_token`) and
the smallest share of the image holding a share of the mass (`erf_area_XX`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from localitylab.errors import UserError
from localitylab.models.anchors import GridAnchor
from localitylab.probes.area_ratio import area_ratios

FeatureFn = Callable[[torch.Tensor], list[torch.Tensor]]

AREA_PERCENTS = (20, 30, 50, 99)  # RepLKNet's high-contribution area ratios


@dataclass(frozen=True)
class FieldLocation:
    """The feature location a layer's ERF is read at: its grid position, its pixel anchor
    (`centre`), its own cell on the image (top, left, bottom, right in pixels: the token's
    patch, or a ConvNet location's stride cell, centred on the anchor), and a note where it
    is not at the image's centre (a 1x1 map)."""

    row: int
    col: int
    centre: tuple[float, float]
    cell: tuple[float, float, float, float]
    note: str = ""


def field_location(height: int, width: int, grid_h: int, grid_w: int,
                   anchor: GridAnchor | None = None) -> FieldLocation:
    """`centre_location` with the location's cell (one step of its grid on each side of its
    anchor, so a ViT token's cell is its patch) and a note where the cell does not hold the
    image's centre pixel (a 1x1 map: no location at the centre, so its own is used)."""
    row, col, centre = centre_location(height, width, grid_h, grid_w, anchor)
    step = anchor.step if anchor is not None else (height / grid_h, width / grid_w)
    cell = (centre[0] - step[0] / 2, centre[1] - step[1] / 2, centre[0] + step[0] / 2, centre[1] + step[1] / 2)
    middle = (height // 2 + 0.5, width // 2 + 0.5)
    note = ""
    if not (cell[0] <= middle[0] < cell[2] and cell[1] <= middle[1] < cell[3]):
        where = "by convolution arithmetic" if anchor is not None else "on an evenly stretched grid"
        note = (f"{grid_h}x{grid_w} map: no location at the image centre; its location ({row}, {col}) is used, "
                f"centred at pixel ({centre[0]:g}, {centre[1]:g}) {where}")
    return FieldLocation(row, col, centre, cell, note)


def cell_overlap(shape: tuple[int, int], cell: tuple[float, float, float, float]) -> np.ndarray:
    """(H*W,) share of each pixel's area (pixel (r, c) covers [r, r+1) x [c, c+1)) inside `cell`."""
    top, left, bottom, right = cell
    rows = np.clip(np.minimum(np.arange(1, shape[0] + 1), bottom) - np.maximum(np.arange(shape[0]), top), 0, 1)
    cols = np.clip(np.minimum(np.arange(1, shape[1] + 1), right) - np.maximum(np.arange(shape[1]), left), 0, 1)
    return (rows[:, None] * cols[None, :]).ravel()


def outside_cell(maps: np.ndarray, shape: tuple[int, int], cell: tuple[float, float, float, float]) -> np.ndarray:
    """`erf_outside_token` of each row of (B, H*W) maps: 1 - the mass inside the cell, each
    pixel counted by the share of its area inside (NaN for an all-zero map)."""
    totals = maps.sum(axis=1)
    inside = maps @ cell_overlap(shape, cell)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(totals > 0, 1.0 - inside / totals, np.nan)


def erf_statistics(maps: np.ndarray, shape: tuple[int, int], location: FieldLocation,
                   side: int) -> list[tuple[str, np.ndarray]]:
    """(metric, (B,) values) of one layer's (B, H*W) ERF maps (unnormalised is fine), in the
    order the table lists them: radii, the share outside the location's cell, area ratios."""
    measures = []
    for percent in (50, 90):
        radius = mass_radii(maps, shape, location.centre, percent / 100)
        measures += [(f"erf_r{percent}_px", radius), (f"erf_r{percent}_frac", radius / side)]
    measures.append(("erf_outside_token", outside_cell(maps, shape, location.cell)))
    areas = area_ratios(maps, tuple(p / 100 for p in AREA_PERCENTS))
    return measures + [(f"erf_area_{p}", area) for p, area in zip(AREA_PERCENTS, areas)]


def erf_resampler(gradients: torch.Tensor, locations: list[FieldLocation], side: int):
    """For the bootstrap: `erf_statistics` of every layer's ERF on resampled images, in the
    order `measure` lists them. The ERF of a resample is the sum of its images' gradient maps
    (with multiplicity), normalised. What can be summed per image first is: the mass per
    ring of equal distance (the radii) and inside the location's cell (the outside share), so
    a resample sums those rather than its pixels; the area ratios need the resample's whole map."""
    count, layers, height, width = gradients.shape
    flat = gradients.double().reshape(count, layers, height * width).numpy()
    per_layer = []
    for layer, location in enumerate(locations):
        order, starts, distance = distance_rings((height, width), location.centre)
        rings = np.add.reduceat(flat[:, layer][:, order], starts, axis=1)
        per_layer.append((rings, distance, flat[:, layer] @ cell_overlap((height, width), location.cell)))
    fractions = tuple(p / 100 for p in AREA_PERCENTS)

    def resample(indices: np.ndarray) -> np.ndarray:
        indices = np.atleast_2d(indices)
        weights = np.zeros((len(indices), count))
        np.add.at(weights, (np.arange(len(indices))[:, None], indices), 1.0)
        values = []
        for layer, (rings, distance, inside) in enumerate(per_layer):
            ring_sums = weights @ rings  # (B, rings): the resample's ERF per ring, unnormalised
            for percent in (50, 90):
                radius = ring_radii(ring_sums, distance, percent / 100)
                values += [radius, radius / side]
            totals = ring_sums.sum(axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                values.append(np.where(totals > 0, 1.0 - (weights @ inside) / totals, np.nan))
            values += list(area_ratios(weights @ flat[:, layer], fractions))
        return np.stack(values)

    return resample


def centre_location(height: int, width: int, grid_h: int, grid_w: int,
                    anchor: GridAnchor | None = None) -> tuple[int, int, tuple[float, float]]:
    """(row, col) of the feature location nearest the image's centre pixel (H//2, W//2), and
    its pixel anchor. With the convolution arithmetic's `anchor` that is the centre of the
    location's receptive field (docs/probes.md); without, the centre of its cell on an evenly
    stretched grid, ((i + 0.5) H / h, ...)."""
    if anchor is None:
        anchor = GridAnchor((0.5 * height / grid_h, 0.5 * width / grid_w), (height / grid_h, width / grid_w))
    row, col = anchor.nearest(height // 2 + 0.5, width // 2 + 0.5, grid_h, grid_w)
    return row, col, anchor.centre(row, col)


def mass_radius(mass: torch.Tensor, centre: tuple[float, float], fraction: float) -> float:
    """Radius of the smallest disc around `centre` (pixel units) holding `fraction` of the
    map's mass; pixel (r, c) sits at (r + 0.5, c + 0.5). NaN for an all-zero map."""
    radii = mass_radii(mass.detach().double().cpu().reshape(1, -1).numpy(), mass.shape[-2:], centre, fraction)
    return float(radii[0])


def mass_radii(maps: np.ndarray, shape: tuple[int, int], centre: tuple[float, float], fraction: float) -> np.ndarray:
    """`mass_radius` of each row of (B, H*W) maps at once (NaN for an all-zero map)."""
    height, width = shape
    rows = np.arange(height, dtype=np.float64)[:, None] + 0.5
    cols = np.arange(width, dtype=np.float64)[None, :] + 0.5
    distance = np.sqrt((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2).ravel()
    order = np.argsort(distance, kind="stable")
    totals = maps.sum(axis=1)
    cumulative = np.cumsum(maps[:, order], axis=1) / np.where(totals > 0, totals, 1.0)[:, None]
    # Tolerance: a uniform map's cumulative mass hits 0.5 exactly, up to float rounding.
    index = (cumulative < fraction - 1e-9).sum(axis=1).clip(max=len(order) - 1)
    return np.where(totals > 0, distance[order][index], np.nan)


def distance_rings(shape: tuple[int, int], centre: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """The pixels of `mass_radii`'s order grouped by equal distance from `centre`: (order,
    starts of each group in it) and each group's distance. A map's mass summed per group
    (`np.add.reduceat(map[order], starts)`) gives `mass_radii` the same radius at a fraction
    of the pixels, so a bootstrap sums its resamples over rings rather than pixels."""
    height, width = shape
    rows = np.arange(height, dtype=np.float64)[:, None] + 0.5
    cols = np.arange(width, dtype=np.float64)[None, :] + 0.5
    distance = np.sqrt((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2).ravel()
    order = np.argsort(distance, kind="stable")
    ordered = distance[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    return order, starts, ordered[starts]


def ring_radii(rings: np.ndarray, ring_distance: np.ndarray, fraction: float) -> np.ndarray:
    """`mass_radii` of (B, R) maps already summed per ring (`distance_rings`)."""
    totals = rings.sum(axis=1)
    cumulative = np.cumsum(rings, axis=1) / np.where(totals > 0, totals, 1.0)[:, None]
    index = (cumulative < fraction - 1e-9).sum(axis=1).clip(max=len(ring_distance) - 1)
    return np.where(totals > 0, ring_distance[index], np.nan)


def centroid(mass: torch.Tensor) -> tuple[float, float]:
    height, width = mass.shape[-2:]
    weights = mass.double() / mass.double().sum().clamp_min(1e-300)
    rows = torch.arange(height, dtype=torch.float64) + 0.5
    cols = torch.arange(width, dtype=torch.float64) + 0.5
    return float((weights.sum(1) * rows).sum()), float((weights.sum(0) * cols).sum())


# --- feature maps per layer --------------------------------------------------------------

def _is_stage(module_name: str) -> bool:
    """A block or stage of timm's feature_info, as opposed to a stem."""
    head = module_name.split(".")[0]
    return head in ("blocks", "stages", "layers", "levels") or (head.startswith("layer") and head[5:].isdigit())


def layer_feature_maps(model: nn.Module) -> FeatureFn:
    """A function x -> [NCHW output of every block / stage], the model's own forward (its
    `model` attribute is the model, whose convolution arithmetic places the locations)."""
    if isinstance(model, nn.Sequential):
        def sequential(x: torch.Tensor) -> list[torch.Tensor]:
            outputs = []
            for child in model:
                x = child(x)
                outputs.append(x)
            return outputs

        sequential.model = model
        return sequential
    if hasattr(model, "forward_intermediates"):
        names = [info["module"] for info in getattr(model, "feature_info", []) if isinstance(info, dict)]
        indices = [i for i, name in enumerate(names) if _is_stage(name)] or None

        def intermediates(x: torch.Tensor) -> list[torch.Tensor]:
            return list(model.forward_intermediates(x, indices=indices, intermediates_only=True, output_fmt="NCHW"))

        intermediates.model = model
        return intermediates
    raise UserError(f"{type(model).__name__} has no forward_intermediates and is not an nn.Sequential; "
                    "the receptive-field probe needs per-layer feature maps (valid: timm models, nn.Sequential)")

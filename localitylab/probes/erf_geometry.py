"""What receptive-field differentiates and where: the feature maps of every layer, the
feature location at the image's centre (docs/probes.md, Geometry) and the radius of the disc
that holds a share of a map's mass (`erf_rXX_px`, `attribution_r50_px`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from localitylab.errors import UserError
from localitylab.models.anchors import GridAnchor

FeatureFn = Callable[[torch.Tensor], list[torch.Tensor]]



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

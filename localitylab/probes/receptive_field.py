"""Effective receptive field per layer (Luo et al. 2016; Raghu et al. 2021), and class
attributions (captum) as a second view.

ERF of layer l: take the feature location of layer l's output that holds the image's centre
pixel (H//2, W//2); differentiate the sum over channels of its features with respect to the
model's input pixels; take |gradient|, sum over input channels, average over images and
normalise to sum 1. One forward per batch of images and one backward per layer: the images
of a batch are independent in eval mode, so the gradient of the batch sum holds every
image's own gradient.

Layers are the blocks of a transformer and the stages of a ConvNet, both through timm's
`forward_intermediates` (NCHW maps, prefix tokens dropped; a ConvNet's stem is left out so
`layer` counts stages), or the children of an `nn.Sequential`. Everything else is the same
code path.

Radii: `erf_rXX_px` is the radius of the smallest disc around the anchor of that feature
location (the centre of its receptive field by convolution arithmetic, docs/probes.md) that
holds XX% of the mass, pixels counted at their centres. `uniform_rXX_px` is the same for a
uniform map: pure geometry. A 1x1 map has no location at the centre: its own location is
used, centred where convolution arithmetic puts it, and the rows' note says so. Radii of
transformers take the few values their patch allows, so the continuous measures sit beside
them: `erf_outside_token` (the mass outside the location's own cell: its token's patch, a
ConvNet location's stride cell; `uniform_outside_token` for a uniform map) and RepLKNet's
`erf_area_20/30/50/99` (the smallest share of the image holding that share of the mass). Attribution maps (Saliency; IntegratedGradients from a zero baseline,
i.e. the mean image, with `internal_batch_size` bounding memory) are measured per image
around the map's own mass centroid, since an object need not sit at the image centre:
`attribution_r50_px` is the mean over images; `uniform_r50_px` with setting `attribution`
is a uniform map's radius around the image centre, for scale.

When a model carries a training pixel permutation, maps live on the grid the model sees
(after that permutation), where its tokens and feature maps are laid out.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from pydantic import field_validator

from localitylab.models.anchors import conv_arithmetic
from localitylab.probes.erf_geometry import (AREA_PERCENTS, FeatureFn, FieldLocation, area_ratios,  # noqa: F401
                                             centre_location, centroid, erf_resampler, erf_statistics,
                                             field_location, layer_feature_maps, mass_radii, mass_radius,
                                             outside_cell)
from localitylab.probes.base import Measurements, Probe, ProbeInputs, SummaryColumn
from localitylab.plotting import probes as drawings
from localitylab.probes.registry import register_probe
from localitylab.probes.target import ProbeTarget
from localitylab.probes.settings import option
from localitylab.settings import Settings

DEFAULT_IG_STEPS = 16


# --- the effective receptive field ------------------------------------------------------------

def layer_gradients(features: FeatureFn, batch: torch.Tensor) -> tuple[torch.Tensor, list[FieldLocation]]:
    """(B, L, H, W) float32 |gradient| of each layer's centre feature with respect to each
    image's pixels of `batch` (a leaf that requires a gradient), summed over input channels,
    and the feature location each layer was read at (its pixel anchor from the convolution
    arithmetic, `localitylab.models.anchors`, and its cell). One forward and one backward per
    layer: the images of a batch are independent in eval mode, so the gradient of the batch
    sum holds every image's own gradient."""
    height, width = batch.shape[-2:]
    model = getattr(features, "model", None)
    gradients, locations = [], []
    with torch.enable_grad():
        recording = conv_arithmetic(model, (height, width)) if model is not None else contextlib.nullcontext()
        with recording as arithmetic:
            maps = features(batch)
        for index, feature_map in enumerate(maps):
            if feature_map.ndim != 4:
                raise ValueError(f"layer {index} gave a {feature_map.ndim}-D output; NCHW maps are needed")
            grid_h, grid_w = feature_map.shape[-2:]
            anchor = arithmetic.anchor(grid_h, grid_w) if arithmetic is not None else None
            location = field_location(height, width, grid_h, grid_w, anchor)
            locations.append(location)
            selected = feature_map[:, :, location.row, location.col].sum()
            (gradient,) = torch.autograd.grad(selected, batch, retain_graph=index < len(maps) - 1)
            gradients.append(gradient.abs().sum(1).cpu())
    return torch.stack(gradients, dim=1), locations


def input_gradients(features: FeatureFn, batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, list[FieldLocation]]:
    """`layer_gradients` of every batch, as (N, L, H, W); the locations are the first batch's."""
    pieces, locations = [], None
    for batch in batches:
        gradients, batch_locations = layer_gradients(features, batch)
        pieces.append(gradients)
        locations = batch_locations if locations is None else locations
    return torch.cat(pieces), locations or []


def erf_maps(gradients: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(L, H, W) ERF maps from per-image gradients (`input_gradients`): the sum over images,
    normalised to sum 1 (zeros where the gradient vanished). Summed batch by batch in
    float32, then in float64, as the maps have always been."""
    totals = torch.zeros(gradients.shape[1:], dtype=torch.float64)
    for start in range(0, len(gradients), batch_size):
        totals += gradients[start:start + batch_size].sum(0).double()
    sums = totals.sum(dim=(1, 2), keepdim=True)
    return torch.where(sums > 0, totals / sums.clamp_min(1e-300), torch.zeros_like(totals))


def effective_receptive_fields(features: FeatureFn, inputs: torch.Tensor,
                               batch_size: int) -> tuple[torch.Tensor, list[tuple[float, float]]]:
    """(L, H, W) ERF maps of prepared `inputs` (no ProbeInputs: any stack of layers), each
    summing to 1 (zeros where the gradient vanished), and the centre in pixels of the feature
    location each layer was read at (`effective_receptive_field_locations`: the locations)."""
    maps, locations = effective_receptive_field_locations(features, inputs, batch_size)
    return maps, [location.centre for location in locations]


def effective_receptive_field_locations(features: FeatureFn, inputs: torch.Tensor,
                                        batch_size: int) -> tuple[torch.Tensor, list[FieldLocation]]:
    """`effective_receptive_fields` with each layer's FieldLocation (centre, cell, note)."""
    batches = (piece.detach().clone().requires_grad_(True) for piece in inputs.split(batch_size))
    gradients, locations = input_gradients(features, batches)
    return erf_maps(gradients, batch_size), locations


def attribution_maps(model: nn.Module, inputs: ProbeInputs, method: str, ig_steps: int = DEFAULT_IG_STEPS) -> torch.Tensor:
    """(N, H, W) |attribution| summed over channels, for each image's true class (captum), on
    the base's gradient-enabled batches."""
    from captum.attr import IntegratedGradients, Saliency

    pieces = []
    for batch in inputs.batches(gradients=True):
        if method == "saliency":
            attribution = Saliency(model).attribute(batch.inputs, target=batch.labels, abs=True)
        elif method == "integrated-gradients":
            # internal_batch_size: at most one batch of interpolated images in memory at a time.
            attribution = IntegratedGradients(model).attribute(
                batch.inputs, baselines=torch.zeros_like(batch.inputs), target=batch.labels, n_steps=ig_steps,
                internal_batch_size=inputs.batch_size)
        else:
            raise ValueError(f"unknown attribution method {method!r}")
        pieces.append(attribution.detach().abs().sum(1).double().cpu())
    return torch.cat(pieces)


# --- the probe --------------------------------------------------------------------------------

class ReceptiveFieldOptions(Settings):
    ig_steps: int = option(DEFAULT_IG_STEPS, "receptive-field: IntegratedGradients interpolation steps.")

    @field_validator("ig_steps", mode="before")
    @classmethod
    def _whole(cls, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"ig_steps must be a whole number >= 1, got {value!r}")
        return value


@dataclass
class ErfDrawing:
    maps: torch.Tensor  # (L, H, W), each summing to 1
    centres: list[tuple[float, float]]


@register_probe
class ReceptiveFieldProbe(Probe):
    name = "receptive-field"
    summary = ("Effective receptive field per block/stage (gradient of the feature location at the image centre, or a "
               "1x1 map's own location, w.r.t. input pixels): share outside the location's own token/cell, "
               "high-contribution area ratios, r50/r90 radii vs a uniform map; captum attribution radii")
    applies_to = "every classifier with per-layer feature maps (timm forward_intermediates)"
    Options = ReceptiveFieldOptions
    denoiser_reason = "it differentiates a classifier's features; denoisers are not measured yet"
    summary_columns = (
        SummaryColumn("erf_r50", "ERF r50 (frac)",
                      "radius holding 50% of the last layer's effective receptive field (of the feature location at "
                      "the image centre; a 1x1 map's own location, centred by convolution arithmetic), / image side",
                      "erf_r50_frac", layer="last", better="low",
                      sentence="has the tightest effective receptive field in its last layer (ERF r50)"),
    )

    def not_applicable(self, target: ProbeTarget) -> str | None:
        reason = super().not_applicable(target)
        if reason or isinstance(target.model, nn.Sequential) or hasattr(target.model, "forward_intermediates"):
            return reason
        return f"{type(target.model).__name__} has no forward_intermediates: no per-layer feature maps"

    def measure(self, inputs: ProbeInputs, out: Measurements) -> ErfDrawing:
        target = inputs.target
        batches = (batch.inputs for batch in inputs.batches(gradients=True))
        gradients, locations = input_gradients(layer_feature_maps(target.model), batches)
        maps = erf_maps(gradients, inputs.batch_size)
        height, width = maps.shape[-2:]
        side = max(height, width)
        note = "on the model's permuted input grid" if target.data.permutation is not None else ""
        uniform = torch.ones(height, width)
        statistics = []
        for layer, (erf, location) in enumerate(zip(maps, locations)):
            layer_note = "; ".join(n for n in (note, location.note) if n)
            if erf.sum() == 0:
                layer_note = "the gradient vanished at this layer"
            flat = erf.reshape(1, -1).numpy()
            statistics += [dict(metric=metric, value=float(value[0]), layer=layer, note=layer_note)
                           for metric, value in erf_statistics(flat, (height, width), location, side)]
        out.statistics(statistics, erf_resampler(gradients, locations, side), inputs.n_images)
        for layer, location in enumerate(locations):  # a uniform map's radii: geometry alone, no interval
            for percent in (50, 90):
                reference = mass_radius(uniform, location.centre, percent / 100)
                out.single(f"uniform_r{percent}_px", reference, layer=layer, n_images=0, note=location.note)
                out.single(f"uniform_r{percent}_frac", reference / side, layer=layer, n_images=0, note=location.note)
            outside = float(outside_cell(uniform.reshape(1, -1).double().numpy(), (height, width), location.cell)[0])
            out.single("uniform_outside_token", outside, layer=layer, n_images=0, note=location.note)
        ig_steps = inputs.options.ig_steps
        for method in ("saliency", "integrated-gradients"):
            if target.no_head_reason():  # no class to attribute: the ERF above is all there is
                for metric in ("attribution_r50_px", "attribution_r50_frac"):
                    out.single(metric, None, setting=method, note=f"{target.no_head_reason()}: no class to attribute",
                               n_images=inputs.n_images)
                continue
            attributions = attribution_maps(target.model, inputs, method, ig_steps)
            radii = np.array([mass_radius(m, centroid(m), 0.5) if m.sum() > 0 else math.nan for m in attributions])
            method_note = f"around each map's centroid, for the true class; {note}".rstrip("; ")
            if method == "integrated-gradients":
                method_note += f"; {ig_steps} steps, zero (mean-image) baseline"
            out.per_image("attribution_r50_px", radii, setting=method, note=method_note)
            out.per_image("attribution_r50_frac", radii / side, setting=method, note=method_note)
        out.single("uniform_r50_px", mass_radius(uniform, (height / 2, width / 2), 0.5), setting="attribution",
                   note="uniform map around the image centre", n_images=inputs.n_images)
        return ErfDrawing(maps, [location.centre for location in locations])

    def figures(self, target: ProbeTarget, drawing: ErfDrawing, out_dir: Path) -> list[Path]:
        radii = [tuple(mass_radius(erf, centre, fraction) for fraction in (0.5, 0.9))
                 for erf, centre in zip(drawing.maps, drawing.centres)]
        return [drawings.plot_erf_maps(drawing.maps, drawing.centres, radii, target.display_name,
                                       Path(out_dir) / "receptive-field-maps.png")]

    def plot(self, tables: list[pd.DataFrame], out_dir: Path) -> list[Path]:
        return drawings.plot_receptive_field(tables, out_dir)

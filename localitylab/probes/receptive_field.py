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

Radii: `erf_rXX_px` is the radius of the smallest disc around the centre of that feature
location (((i + 0.5) * H / h, (j + 0.5) * W / w) in pixels, as in docs/probes.md) that holds XX%
of the mass, pixels counted at their centres. `uniform_rXX_px` is the same for a uniform
map: pure geometry. Attribution maps (Saliency; IntegratedGradients from a zero baseline,
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
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from pydantic import field_validator

from localitylab.errors import UserError
from localitylab.models.anchors import GridAnchor, conv_arithmetic
from localitylab.probes.base import Measurements, Probe, ProbeInputs, SummaryColumn, overlay
from localitylab.probes.registry import register_probe
from localitylab.probes.target import ProbeTarget
from localitylab.settings import Settings

DEFAULT_IG_STEPS = 16
FeatureFn = Callable[[torch.Tensor], list[torch.Tensor]]


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


# --- geometry -------------------------------------------------------------------------------

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


def centroid(mass: torch.Tensor) -> tuple[float, float]:
    height, width = mass.shape[-2:]
    weights = mass.double() / mass.double().sum().clamp_min(1e-300)
    rows = torch.arange(height, dtype=torch.float64) + 0.5
    cols = torch.arange(width, dtype=torch.float64) + 0.5
    return float((weights.sum(1) * rows).sum()), float((weights.sum(0) * cols).sum())


# --- the effective receptive field ------------------------------------------------------------

def input_gradients(features: FeatureFn, inputs: torch.Tensor,
                    batch_size: int) -> tuple[torch.Tensor, list[tuple[float, float]]]:
    """(N, L, H, W) float32 |gradient| of each layer's centre feature with respect to each
    image's pixels, summed over input channels, and the pixel anchor of the feature location
    each layer was read at (the convolution arithmetic's, `localitylab.models.anchors`). One
    forward per batch and one backward per layer: the images of a batch are independent in
    eval mode, so the gradient of the batch sum holds every image's own gradient."""
    height, width = inputs.shape[-2:]
    per_image: list[torch.Tensor] = []
    centres: list[tuple[float, float]] = []
    model = getattr(features, "model", None)
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start:start + batch_size].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            recording = conv_arithmetic(model, (height, width)) if model is not None else contextlib.nullcontext()
            with recording as arithmetic:
                maps = features(batch)
            gradients = []
            for index, feature_map in enumerate(maps):
                if feature_map.ndim != 4:
                    raise ValueError(f"layer {index} gave a {feature_map.ndim}-D output; NCHW maps are needed")
                grid_h, grid_w = feature_map.shape[-2:]
                anchor = arithmetic.anchor(grid_h, grid_w) if arithmetic is not None else None
                row, col, centre = centre_location(height, width, grid_h, grid_w, anchor)
                if start == 0:
                    centres.append(centre)
                selected = feature_map[:, :, row, col].sum()
                (gradient,) = torch.autograd.grad(selected, batch, retain_graph=index < len(maps) - 1)
                gradients.append(gradient.abs().sum(1).cpu())
        per_image.append(torch.stack(gradients, dim=1))
    return torch.cat(per_image), centres


def erf_maps(gradients: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(L, H, W) ERF maps from per-image gradients (`input_gradients`): the sum over images,
    normalised to sum 1 (zeros where the gradient vanished). Summed batch by batch in
    float32, then in float64, as the maps have always been."""
    totals = torch.zeros(gradients.shape[1:], dtype=torch.float64)
    for start in range(0, len(gradients), batch_size):
        totals += gradients[start:start + batch_size].sum(0).double()
    sums = totals.sum(dim=(1, 2), keepdim=True)
    return torch.where(sums > 0, totals / sums.clamp_min(1e-300), torch.zeros_like(totals))


def erf_radii_resampler(gradients: torch.Tensor, centres: list[tuple[float, float]], side: int):
    """For the bootstrap: the r50 and r90 radii (px, then / side) of every layer's ERF on
    resampled images, in the order `measure` lists them. The ERF of a resample is the sum of
    its images' gradient maps (with multiplicity), normalised."""
    count, layers, height, width = gradients.shape
    flat = gradients.double().reshape(count, layers, height * width).numpy()

    def resample(indices: np.ndarray) -> np.ndarray:
        indices = np.atleast_2d(indices)
        weights = np.zeros((len(indices), count))
        np.add.at(weights, (np.arange(len(indices))[:, None], indices), 1.0)
        radii = []
        for layer, centre in enumerate(centres):
            summed = weights @ flat[:, layer]  # (B, H*W): the resample's ERF, unnormalised
            for percent in (50, 90):
                radius = mass_radii(summed, (height, width), centre, percent / 100)
                radii += [radius, radius / side]
        return np.stack(radii)

    return resample


def effective_receptive_fields(features: FeatureFn, inputs: torch.Tensor,
                               batch_size: int) -> tuple[torch.Tensor, list[tuple[float, float]]]:
    """(L, H, W) ERF maps, each summing to 1 (zeros where the gradient vanished), and the
    centre in pixels of the feature location each layer was read at."""
    gradients, centres = input_gradients(features, inputs, batch_size)
    return erf_maps(gradients, batch_size), centres


def attribution_maps(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, method: str, batch_size: int,
                     ig_steps: int = DEFAULT_IG_STEPS) -> torch.Tensor:
    """(N, H, W) |attribution| summed over channels, for each image's true class (captum)."""
    from captum.attr import IntegratedGradients, Saliency

    pieces = []
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start:start + batch_size].detach().clone().requires_grad_(True)
        target = labels[start:start + batch_size].to(inputs.device)
        with torch.enable_grad():
            if method == "saliency":
                attribution = Saliency(model).attribute(batch, target=target, abs=True)
            elif method == "integrated-gradients":
                # internal_batch_size: at most one batch of interpolated images in memory at a time.
                attribution = IntegratedGradients(model).attribute(
                    batch, baselines=torch.zeros_like(batch), target=target, n_steps=ig_steps,
                    internal_batch_size=batch_size)
            else:
                raise ValueError(f"unknown attribution method {method!r}")
        pieces.append(attribution.detach().abs().sum(1).double().cpu())
    return torch.cat(pieces)


# --- the probe --------------------------------------------------------------------------------

class ReceptiveFieldOptions(Settings):
    ig_steps: int = DEFAULT_IG_STEPS  # IntegratedGradients interpolation steps

    @field_validator("ig_steps", mode="before")
    @classmethod
    def _whole(cls, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"--opt ig_steps must be a whole number >= 1, got {value!r}")
        return value


@dataclass
class ErfDrawing:
    maps: torch.Tensor  # (L, H, W), each summing to 1
    centres: list[tuple[float, float]]


@register_probe
class ReceptiveFieldProbe(Probe):
    name = "receptive-field"
    summary = ("Effective receptive field per block/stage (gradient of the centre feature w.r.t. input pixels): "
               "r50/r90 radii vs a uniform map; captum attribution radii")
    applies_to = "every classifier with per-layer feature maps (timm forward_intermediates)"
    Options = ReceptiveFieldOptions
    denoiser_reason = "it differentiates a classifier's features; denoisers are not measured yet"
    summary_columns = (
        SummaryColumn("erf_r50", "ERF r50 (frac)",
                      "radius holding 50% of the effective receptive field of the last layer, / image side",
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
        prepared = target.prepare(inputs.images)
        gradients, centres = input_gradients(layer_feature_maps(target.model), prepared, inputs.batch_size)
        maps = erf_maps(gradients, inputs.batch_size)
        height, width = maps.shape[-2:]
        side = max(height, width)
        note = "on the model's permuted input grid" if target.data.permutation is not None else ""
        uniform = torch.ones(height, width)
        statistics = []
        for layer, (erf, centre) in enumerate(zip(maps, centres)):
            layer_note = note if erf.sum() > 0 else "the gradient vanished at this layer"
            for percent in (50, 90):
                radius = mass_radius(erf, centre, percent / 100)
                statistics += [dict(metric=f"erf_r{percent}_px", value=radius, layer=layer, note=layer_note),
                               dict(metric=f"erf_r{percent}_frac", value=radius / side, layer=layer, note=layer_note)]
        out.statistics(statistics, erf_radii_resampler(gradients, centres, side), inputs.n_images)
        for layer, centre in enumerate(centres):  # a uniform map's radii: geometry alone, no interval
            for percent in (50, 90):
                reference = mass_radius(uniform, centre, percent / 100)
                out.single(f"uniform_r{percent}_px", reference, layer=layer, n_images=0)
                out.single(f"uniform_r{percent}_frac", reference / side, layer=layer, n_images=0)
        ig_steps = inputs.options.ig_steps
        for method in ("saliency", "integrated-gradients"):
            if target.no_head_reason():  # no class to attribute: the ERF above is all there is
                for metric in ("attribution_r50_px", "attribution_r50_frac"):
                    out.single(metric, None, setting=method, note=f"{target.no_head_reason()}: no class to attribute",
                               n_images=inputs.n_images)
                continue
            attributions = attribution_maps(target.model, prepared, inputs.labels, method, inputs.batch_size, ig_steps)
            radii = np.array([mass_radius(m, centroid(m), 0.5) if m.sum() > 0 else math.nan for m in attributions])
            method_note = f"around each map's centroid, for the true class; {note}".rstrip("; ")
            if method == "integrated-gradients":
                method_note += f"; {ig_steps} steps, zero (mean-image) baseline"
            out.per_image("attribution_r50_px", radii, setting=method, note=method_note)
            out.per_image("attribution_r50_frac", radii / side, setting=method, note=method_note)
        out.single("uniform_r50_px", mass_radius(uniform, (height / 2, width / 2), 0.5), setting="attribution",
                   note="uniform map around the image centre", n_images=inputs.n_images)
        return ErfDrawing(maps, centres)

    def figures(self, target: ProbeTarget, drawing: ErfDrawing, out_dir: Path) -> list[Path]:
        return [plot_erf_maps(drawing.maps, drawing.centres, target.display_name,
                              Path(out_dir) / "receptive-field-maps.png")]

    def plot(self, tables: list[pd.DataFrame], out_dir: Path) -> list[Path]:
        frame = overlay(tables)
        if frame is None or not frame["metric"].eq("erf_r50_px").any():
            return []
        return [plot_radius_by_depth(frame, Path(out_dir) / "receptive-field.png")]


# --- figures ------------------------------------------------------------------------------------

def plot_radius_by_depth(frame: pd.DataFrame, path: Path) -> Path:
    """ERF r50 and r90 against depth, models overlaid; dashed: a uniform map's radius."""
    import matplotlib.pyplot as plt

    from localitylab.plotting import apply_style, errorbar, model_colours, model_markers, save_figure

    apply_style()
    frame = frame[frame["layer"].notna()]
    models = sorted(frame["model"].unique())
    colours, markers = model_colours(models), model_markers(models)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, percent in zip(axes, (50, 90)):
        for model in models:
            rows = frame[frame["model"] == model]
            erf = rows[rows["metric"] == f"erf_r{percent}_px"].sort_values("layer")
            uniform = rows[rows["metric"] == f"uniform_r{percent}_px"].sort_values("layer")
            errorbar(ax, erf["layer"], erf, marker=markers[model], color=colours[model], label=model)
            ax.plot(uniform["layer"].astype(int), uniform["value"], "--", color=colours[model], alpha=0.5,
                    linewidth=1)
        ax.set(xlabel="layer (block / stage)", title=f"ERF radius holding {percent}% of the mass (bars: 95% CI)")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].set_ylabel("radius (px); dashed: uniform map")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_erf_maps(maps: torch.Tensor, centres: list[tuple[float, float]], model_name: str, path: Path) -> Path:
    """One heat map per layer, with the r50 (solid) and r90 (dashed) discs."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Circle

    from localitylab.plotting import apply_style, save_figure

    apply_style()
    count = len(maps)
    columns = min(count, 6)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.6 * rows + 0.4), squeeze=False)
    height, width = maps.shape[-2:]
    cmap = plt.get_cmap("magma").with_extremes(bad="black")
    for index, ax in enumerate(axes.flat):
        if index >= count:
            ax.axis("off")
            continue
        erf, centre = maps[index], centres[index]
        peak = float(erf.max())
        # Log scale: the centre pixel's own path (the residual stream) would hide the rest;
        # exact zeros (outside a ConvNet's window) stay black.
        norm = LogNorm(vmin=peak * 1e-3, vmax=peak) if peak > 0 else None
        ax.imshow(np.ma.masked_less_equal(erf.numpy(), 0), cmap=cmap, norm=norm, extent=(0, width, height, 0),
                  interpolation="nearest")
        for fraction, style in ((0.5, "-"), (0.9, "--")):
            radius = mass_radius(erf, centre, fraction)
            if math.isfinite(radius):
                ax.add_patch(Circle((centre[1], centre[0]), radius, fill=False, color="cyan", linestyle=style))
        ax.plot(centre[1], centre[0], "+", color="cyan")
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_title(f"layer {index}")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    fig.suptitle(f"{model_name}: effective receptive field, log scale (circles: r50, r90 dashed)")
    fig.tight_layout()
    return save_figure(fig, path)

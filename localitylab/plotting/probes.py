"""The figures of every probe, apart from what they measure: each probe's `figures` (per
model, from what its `measure` returned) and `plot` (several models' tables overlaid) call
the functions here. Imports point one way: the probes import this module, never the reverse;
what a figure needs of a probe's measurement is handed to it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from localitylab.plotting import (apply_style, errorbar, grouped_bars, keep_reference_in_view, legend_if_labelled,
                                 model_colours, model_markers, save_figure)

# The narrowest y range of a ratio to 1 (locality ratio): twice the smallest difference worth a
# word (docs/probes.md, effect size), so noise never fills the axis.
RATIO_MIN_SPAN = 0.1
RADIUS_MIN_SPAN_PX = 1.0

REFERENCES_PER_SIDE = 8  # pe-similarity: reference tokens per side of the grid


def overlay(tables: list[pd.DataFrame], keep: Callable[[pd.DataFrame], pd.Series] | None = None) -> pd.DataFrame | None:
    """Several models' tables as one frame for a figure, the rows `keep` selects with a value;
    None when nothing is left to draw. A model name met in more than one table gets a ' #k'
    suffix there, so two runs of one model stay two lines."""
    seen: dict[str, int] = {}
    frames = []
    for table in tables:
        renames = {}
        for model in table["model"].unique():
            count = seen.get(model, 0)
            seen[model] = count + 1
            if count:
                renames[model] = f"{model} #{count + 1}"
        frames.append(table.replace({"model": renames}) if renames else table)
    if not frames:
        return None
    frame = pd.concat(frames, ignore_index=True)
    frame = frame[frame["value"].notna()]
    if keep is not None:
        frame = frame[keep(frame)]
    return None if frame.empty else frame


def plot_attention_distance(tables: list[pd.DataFrame], out_dir: Path) -> list[Path]:
    """ViT-paper view: a dot per head against depth, and the locality ratio per layer."""
    import matplotlib.pyplot as plt


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
    keep_reference_in_view(ax_ratio, 1.0, RATIO_MIN_SPAN)
    ax_dist.set_ylim(0.0, max(ax_dist.get_ylim()[1], 1e-9) * 1.08)  # from 0, the uniform lines in view
    fig.suptitle("Attention distance in input pixels (left) and as a ratio to uniform attention (right; "
                 "1 = no preference for near tokens, below 1 = local)", fontsize="medium")
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
        keep_reference_in_view(ax, 1.0, RATIO_MIN_SPAN)
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


def attention_maps_figures(target: Any, drawing: Any, out_dir: Path) -> list[Path]:
    geometry = target.geometry
    paths = []
    for q, (row, col) in enumerate(drawing.queries):
        stem = f"attention-maps-q{row}-{col}"
        maps = drawing.maps[:, :, :, q]
        paths.append(_draw(maps.mean(dim=2, keepdim=True), drawing.pictures, (row, col), geometry,
                           target.display_name, Path(out_dir) / f"{stem}.png", head_labels=None))
        if drawing.per_head:
            few = min(2, len(maps))
            paths.append(_draw(maps[:few], drawing.pictures[:few], (row, col), geometry, target.display_name,
                               Path(out_dir) / f"{stem}-heads.png", head_labels=list(range(maps.shape[2]))))
    return paths


def plot_attention_maps(tables: list[pd.DataFrame], out_dir: Path) -> list[Path]:
    """Attended distance (head mean) of each query against depth, models overlaid."""
    import matplotlib.pyplot as plt


    frame = overlay(tables, lambda f: (f["metric"] == "query_distance_px") & f["head"].isna())
    if frame is None:
        return []
    apply_style()
    fig, ax = plt.subplots(figsize=(6, 4))
    colours = model_colours(frame["model"])
    styles = ["-", "--", ":", "-."]
    for (model, setting), rows in frame.groupby(["model", "setting"], sort=True):
        style = styles[sorted(frame["setting"].unique()).index(setting) % len(styles)]
        rows = rows.sort_values("layer")
        errorbar(ax, rows["layer"], rows, color=colours[model], linestyle=style, marker="o",
                 label=f"{model}, {setting}")
    ax.set(xlabel="layer (block)", ylabel="attended distance (pixels)",
           title="Attention distance of the query (bars: 95% CI)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize="small")
    return [save_figure(fig, Path(out_dir) / "attention-maps-distance.png")]


def _draw(maps: torch.Tensor, pictures: np.ndarray, query: tuple[int, int], geometry: Any,
          model_name: str, path: Path, head_labels: list[int] | None) -> Path:
    """maps: (images, layers, heads, grid_h, grid_w); one row per image and head."""
    import matplotlib.pyplot as plt


    apply_style()
    n_images, n_layers, n_heads = maps.shape[:3]
    height, width = geometry.image_shape
    extent = (0, width, height, 0)
    n_rows = n_images * n_heads
    fig, axes = plt.subplots(n_rows, n_layers + 1, figsize=(1.7 * (n_layers + 1), 1.7 * n_rows + 0.4), squeeze=False)
    grey = pictures.ndim == 3
    # One colour scale for every thumbnail, so shades compare across layers and heads.
    top = float(maps.max()) if maps.numel() else 1.0
    norm = plt.Normalize(vmin=0.0, vmax=top if top > 0 else 1.0)
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
                          interpolation="nearest", norm=norm)
                if image == 0 and head == 0:
                    ax.set_title(f"layer {layer}", fontsize="small")
            for ax in axes_row:
                ax.plot(query[1] + 0.5, query[0] + 0.5, marker="x", color="cyan", markersize=7, mew=2)
                ax.set_xticks([])
                ax.set_yticks([])
    axes[0][0].set_title("input", fontsize="small")
    scale = plt.cm.ScalarMappable(norm=norm, cmap="inferno")
    fig.colorbar(scale, ax=axes, shrink=0.8, label="attention weight on the key token")
    what = "per head" if head_labels is not None else "mean over heads"
    fig.suptitle(f"{model_name}: where the query at pixel ({query[0]}, {query[1]}) (cyan x) attends, per layer, "
                 f"{what}", fontsize="medium")
    return save_figure(fig, path)


def pe_similarity_figures(target: Any, unit: torch.Tensor, out_dir: Path) -> list[Path]:
    """The ViT paper's cosine-similarity maps for a grid of reference tokens."""
    import matplotlib.pyplot as plt


    grid_h, grid_w = target.geometry.grid
    ref_rows = np.unique(np.linspace(0, grid_h - 1, min(REFERENCES_PER_SIDE, grid_h)).round().astype(int))
    ref_cols = np.unique(np.linspace(0, grid_w - 1, min(REFERENCES_PER_SIDE, grid_w)).round().astype(int))
    apply_style()
    fig, axes = plt.subplots(len(ref_rows), len(ref_cols), figsize=(1.1 * len(ref_cols) + 1.2, 1.1 * len(ref_rows)),
                             squeeze=False, gridspec_kw={"wspace": 0.05, "hspace": 0.05})
    image = None
    for a, row in enumerate(ref_rows):
        for b, col in enumerate(ref_cols):
            similarity = (unit @ unit[row * grid_w + col]).reshape(grid_h, grid_w).numpy()
            ax = axes[a][b]
            image = ax.imshow(similarity, vmin=-1, vmax=1, cmap="viridis", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if a == len(ref_rows) - 1:
                ax.set_xlabel(str(col), fontsize="medium")
            if b == 0:
                ax.set_ylabel(str(row), fontsize="medium", rotation=0, labelpad=10, va="center")
    fig.supxlabel("reference token: column", fontsize="medium")
    fig.supylabel("reference token: row", fontsize="medium")
    bar = fig.colorbar(image, ax=axes, shrink=0.8)
    bar.set_label("cosine similarity", fontsize="medium")
    bar.ax.tick_params(labelsize="medium")
    fig.suptitle(f"{target.display_name}: cosine similarity of each reference token's position embedding\n"
                 "with every token's (one map per reference token, placed at its grid position)", fontsize="medium")
    return [save_figure(fig, Path(out_dir) / "pe-similarity.png")]


def plot_pe_similarity(tables: list[pd.DataFrame], out_dir: Path, METRICS: tuple[str, ...]) -> list[Path]:
    """The three scores side by side, one bar per model (bars: the spread over seeds where
    a report combines several; a single model's scores have no interval)."""
    import matplotlib.pyplot as plt


    frame = overlay(tables, lambda f: f["metric"].isin(METRICS))
    if frame is None:
        return []
    apply_style()
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(METRICS), 3.8))
    grouped_bars(ax, frame, "metric", list(METRICS), model_colours(frame["model"]))
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set(xlabel="", ylabel="score (1 = the grid, 0 = none)", title="Position embedding vs the 2-D grid",
           ylim=(min(-0.1, float(frame["value"].min()) - 0.05), 1.05))
    ax.legend(fontsize="small", title="no interval: properties of the weights", title_fontsize="x-small")
    return [save_figure(fig, Path(out_dir) / "pe-similarity-metrics.png")]


def mae_reconstruction_figures(target: Any, drawing: Any, out_dir: Path) -> list[Path]:
    """Masked input, reconstruction and original for the first few probe images."""
    import matplotlib.pyplot as plt


    labels = ("masked input", "reconstruction", "original")
    count = len(drawing.panels[0])
    apply_style()
    size = 1.3
    fig, axes = plt.subplots(3, count, figsize=(size * count + 1.4, size * 3 + 0.6), squeeze=False,
                             gridspec_kw={"wspace": 0.04, "hspace": 0.04})
    for row, (label, panel) in enumerate(zip(labels, drawing.panels)):
        for col in range(count):
            ax = axes[row][col]
            ax.imshow(panel[col].permute(1, 2, 0).numpy(), interpolation="nearest", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            if col == 0:
                ax.set_ylabel(label, fontsize="small")
    title = (f"{target.display_name}: MAE reconstruction, {round(drawing.mask_ratio * 100):g}% of tokens masked "
             f"(seed {drawing.seed})")
    if drawing.unpermuted:
        title += ", shown un-permuted"
    fig.suptitle(title, fontsize="medium")
    return [save_figure(fig, Path(out_dir) / "mae-reconstruction.png")]


def plot_mae_reconstruction(tables: list[pd.DataFrame], out_dir: Path) -> list[Path]:
    """relative_mse (averaged over mask draws) per model."""
    import matplotlib.pyplot as plt


    frame = overlay(tables, lambda f: (f["metric"] == "relative_mse") & ~f["setting"].astype(str).str.contains("-seed-"))
    if frame is None:
        return []
    apply_style()
    fig, ax = plt.subplots(figsize=(5.5, 1.2 + 0.45 * frame["model"].nunique()))
    grouped_bars(ax, frame, "metric", ["relative_mse"], model_colours(frame["model"]), horizontal=True)
    ax.legend(fontsize="small")
    ax.axvline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set(xlabel="masked-token MSE / MSE of the mean colour (lower is better)", ylabel="",
           title="MAE reconstruction of masked tokens (bars: 95% CI)")
    return [save_figure(fig, Path(out_dir) / "mae-reconstruction-relative-mse.png")]


def plot_receptive_field(tables: list[pd.DataFrame], out_dir: Path) -> list[Path]:
    frame = overlay(tables)
    if frame is None or not frame["metric"].eq("erf_r50_px").any():
        return []
    return [plot_radius_by_depth(frame, Path(out_dir) / "receptive-field.png")]


def plot_radius_by_depth(frame: pd.DataFrame, path: Path) -> Path:
    """ERF r50 and r90 against depth, models overlaid; dashed: a uniform map's radius."""
    import matplotlib.pyplot as plt


    apply_style()
    frame = frame[frame["layer"].notna()]
    models = sorted(frame["model"].unique())
    colours, markers = model_colours(models), model_markers(models)
    outside = frame[frame["metric"] == "erf_outside_token"]
    fig, axes = plt.subplots(1, 3 if len(outside) else 2, figsize=(15 if len(outside) else 10, 4))
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
        keep_reference_in_view(ax, 0.0, RADIUS_MIN_SPAN_PX)
        ax.set_ylabel("radius (px); dashed: uniform map")
    if len(outside):
        ax = axes[2]
        for model in models:
            rows = frame[frame["model"] == model]
            share = rows[rows["metric"] == "erf_outside_token"].sort_values("layer")
            uniform = rows[rows["metric"] == "uniform_outside_token"].sort_values("layer")
            errorbar(ax, share["layer"], share, marker=markers[model], color=colours[model], label=model)
            ax.plot(uniform["layer"].astype(int), uniform["value"], "--", color=colours[model], alpha=0.5, linewidth=1)
        ax.set(xlabel="layer (block / stage)", ylabel="share of ERF mass; dashed: uniform map", ylim=(-0.02, 1.02),
               title="ERF mass outside the own token / stride cell (bars: 95% CI)")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize=8)
    fig.suptitle("Effective receptive field against depth, at the feature location holding the image centre "
                 "(a 1x1 map: its own location)", fontsize="medium")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_erf_maps(maps: torch.Tensor, centres: list[tuple[float, float]], radii: list[tuple[float, float]],
                  model_name: str, path: Path) -> Path:
    """One heat map per layer, with the r50 (solid) and r90 (dashed) discs (`radii`: per layer)."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Circle


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
        for radius, style in zip(radii[index], ("-", "--")):
            if math.isfinite(radius):
                ax.add_patch(Circle((centre[1], centre[0]), radius, fill=False, color="cyan", linestyle=style))
        ax.plot(centre[1], centre[0], "+", color="cyan")
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_title(f"layer {index}")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
        if norm is not None:
            bar = fig.colorbar(ax.images[-1], ax=ax, fraction=0.046, pad=0.03)
            bar.ax.tick_params(labelsize="small")
    fig.suptitle(f"{model_name}: effective receptive field per layer, share of the gradient mass per input pixel\n"
                 "(log colour scale; black: exactly 0) of the feature location at + (the one holding the image centre; "
                 "a 1x1 map's own location); circles: r50, r90 dashed")
    fig.tight_layout()
    return save_figure(fig, path)


def _family(setting: str) -> str:
    if setting.startswith("swaps-"):
        return f"swaps, d={setting.rsplit('-', 1)[1]}"
    return setting.rsplit("-", 1)[0] if setting[-1].isdigit() else setting


def plot_permutations(tables: list[pd.DataFrame], out_dir: Path) -> list[Path]:
    frame = overlay(tables)
    if frame is None or not frame["metric"].eq("accuracy").any():
        return []
    # Models whose clean accuracy's interval includes chance: their order dependence is empty, with this note.
    everything = overlay([t.assign(value=t["value"].fillna(0.0)) for t in tables])
    at_chance = set(everything.loc[(everything["metric"] == "order_dependence")
                                   & everything["note"].astype(str).str.contains("includes chance"), "model"])
    return [plot_permutation(frame, Path(out_dir) / "permutation.png", at_chance)]


def plot_permutation(frame: pd.DataFrame, path: Path, at_chance: set[str] = frozenset()) -> Path:
    """Left: accuracy against the number of test-time swaps T (one line per model and
    distance d). Right: accuracy against the mean pixel displacement of every shuffle,
    models overlaid. Bars: 95% intervals over images and permutation draws."""
    import matplotlib.pyplot as plt


    apply_style()
    accuracy = frame[frame["metric"] == "accuracy"].set_index(["model", "setting"])
    displacement = frame[frame["metric"] == "mean_displacement_px"].set_index(["model", "setting"])["value"]
    models = sorted(frame["model"].unique())
    colours = model_colours(models)
    fig, (swaps_ax, strength_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    line_styles = ["-", "--", ":", "-."]
    family_markers = {"global": "X", "local": "s", "patch-shuffle": "^", "swaps": "o"}
    for model in models:
        colour = colours[model]
        rows = accuracy.loc[model]
        name = f"{model} (at chance)" if model in at_chance else model
        clean = rows.loc["clean", "value"] if "clean" in rows.index else None
        swaps = rows[rows.index.str.startswith("swaps-")]
        distances = sorted({s.rsplit("-", 1)[1] for s in swaps.index}, key=lambda d: math.inf if d == "inf" else float(d))
        for i, distance in enumerate(distances):
            sweep = swaps[swaps.index.str.endswith(f"-{distance}")].copy()
            sweep["swaps"] = [int(s.split("-")[1]) for s in sweep.index]
            if "clean" in rows.index:
                sweep = pd.concat([rows.loc[["clean"]].assign(swaps=0), sweep[sweep["swaps"] > 0]])
            sweep = sweep.sort_values("swaps")
            errorbar(swaps_ax, sweep["swaps"], sweep, color=colour, linestyle=line_styles[i % len(line_styles)],
                     marker="o", label=f"{name}, d={distance}")
        for family, marker in family_markers.items():
            points = rows[[(_family(s) == family or (family == "swaps" and s.startswith("swaps-")))
                           and (model, s) in displacement.index for s in rows.index]]
            if points.empty:
                continue
            x = [displacement[(model, s)] for s in points.index]
            order = sorted(range(len(x)), key=x.__getitem__)
            errorbar(strength_ax, [x[i] for i in order], points.iloc[order], color=colour, marker=marker,
                     linestyle="-" if family != "swaps" else "none", markersize=6 if family != "swaps" else 4,
                     alpha=1.0 if family != "swaps" else 0.7, label=f"{name}: {family}")
        if clean is not None:
            strength_ax.axhline(clean, color=colour, linewidth=0.8, alpha=0.5)
    swaps_ax.set_xscale("symlog", linthresh=1)
    swaps_ax.set(xlabel="pixel swaps T at test time", ylabel="test accuracy", title="Random swaps (bars: 95% CI)",
                 ylim=(0, 1.02))
    strength_ax.set(xlabel="mean pixel displacement (px)", ylabel="test accuracy",
                    title="Accuracy against shuffle strength", ylim=(0, 1.02))
    legend_if_labelled(swaps_ax, fontsize=7, loc="lower left")
    legend_if_labelled(strength_ax, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle("Test accuracy under test-time pixel shuffles; thin lines: clean accuracy", fontsize="medium")
    fig.tight_layout()
    return save_figure(fig, path)

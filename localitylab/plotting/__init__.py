"""One figure style and one colour per model, shared by every probe figure and report.

Colours are assigned by sorted model name over the set of models being compared, so a
report that passes the same model list to every figure shows each model in one colour
throughout.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Iterator

import matplotlib

matplotlib.use("Agg")  # files only; never a window

import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

from localitylab.io import atomic_path  # noqa: E402

PALETTE = "colorblind"
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def apply_style() -> None:
    sns.set_theme(context="paper", style="whitegrid", palette=PALETTE, font_scale=1.1)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "savefig.bbox": "tight", "axes.titleweight": "bold"})


def model_colours(names: Iterable[str]) -> dict[str, tuple[float, float, float]]:
    """A stable colour for each model name (sorted order over the set given)."""
    unique = sorted(set(names))
    colours = sns.color_palette(PALETTE, max(len(unique), 1))
    if len(unique) > len(colours):
        colours = sns.color_palette("husl", len(unique))
    return {name: colours[i % len(colours)] for i, name in enumerate(unique)}


def model_markers(names: Iterable[str]) -> dict[str, str]:
    unique = sorted(set(names))
    return {name: MARKERS[i % len(MARKERS)] for i, name in enumerate(unique)}


def errorbar(ax, x, rows, **style) -> None:
    """A line through rows' values with their 95% intervals (ci_low, ci_high) as bars;
    rows without an interval get no bar."""
    import numpy as np

    values = rows["value"].to_numpy(dtype=float)
    low = np.nan_to_num(values - rows["ci_low"].to_numpy(dtype=float), nan=0.0).clip(min=0)
    high = np.nan_to_num(rows["ci_high"].to_numpy(dtype=float) - values, nan=0.0).clip(min=0)
    ax.errorbar(np.asarray(x, dtype=float), values, yerr=np.vstack([low, high]), capsize=3, elinewidth=1, **style)


def grouped_bars(ax, frame, category: str, order: list[str], colours: dict, horizontal: bool = False) -> None:
    """One bar per (category, model) with the row's 95% interval as an error bar where it has one."""
    import numpy as np

    models = sorted(frame["model"].unique())
    width = 0.8 / max(1, len(models))
    for index, model in enumerate(models):
        rows = frame[frame["model"] == model].set_index(category).reindex(order)
        positions = np.arange(len(order)) - 0.4 + width * (index + 0.5)
        values = rows["value"].to_numpy(dtype=float)
        low = np.nan_to_num(values - rows["ci_low"].to_numpy(dtype=float), nan=0.0).clip(min=0)
        high = np.nan_to_num(rows["ci_high"].to_numpy(dtype=float) - values, nan=0.0).clip(min=0)
        draw = ax.barh if horizontal else ax.bar
        errors = {"xerr" if horizontal else "yerr": np.vstack([low, high])}
        draw(positions, values, width, color=colours[model], label=model, capsize=3, **errors)
    (ax.set_yticks if horizontal else ax.set_xticks)(np.arange(len(order)), order)


# While `collecting_figures` is active, figures are handed to its list instead of written.
_COLLECTING: list[list[plt.Figure]] = []


@contextlib.contextmanager
def collecting_figures() -> Iterator[list[plt.Figure]]:
    """Within the block, `save_figure` writes nothing: it appends each figure (open) to the
    list yielded, for a caller that returns figures (`localitylab.probe(figures=True)`)."""
    figures: list[plt.Figure] = []
    _COLLECTING.append(figures)
    try:
        yield figures
    finally:
        _COLLECTING.remove(figures)


def keep_reference_in_view(ax, reference: float | None = None, min_span: float = 0.0) -> None:
    """Y range that includes `reference` (a uniform map's or uniform attention's value) and
    spans at least `min_span`, so an axis never zooms into differences smaller than the
    scale a reader should judge them on (the intervals' and the smallest effect's)."""
    low, high = ax.get_ylim()
    if reference is not None:
        low, high = min(low, reference), max(high, reference)
    if high - low < min_span:
        middle = (low + high) / 2
        low, high = middle - min_span / 2, middle + min_span / 2
        if reference is not None:  # still in view after widening
            low, high = min(low, reference), max(high, reference)
    ax.set_ylim(low, high)


def legend_if_labelled(ax, **options) -> None:
    """A legend only where something carries a label (no empty-legend warning)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, **options)


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Write a figure atomically (format from the suffix) and close it (or, while
    `collecting_figures`, hand it over open)."""
    path = Path(path)
    if _COLLECTING:
        _COLLECTING[-1].append(fig)
        return path
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path

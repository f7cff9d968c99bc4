"""One figure style and one colour per model, shared by every probe figure and report.

Colours are assigned by sorted model name over the set of models being compared, so a
report that passes the same model list to every figure shows each model in one colour
throughout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

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


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Write a figure atomically (format from the suffix) and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path

"""The report's "Locality over training" section: per model, the locality ratio of its first
and last attention block, PE Spearman, how far the position table moved (`pe_moved`, where
the table has it), the ERF radius and test accuracy against epoch, from the tables of
`probe NAME RUN --over-training` and the run's snapshots. Several seeds: the mean over seeds
with the interval of `over_seeds` (t over seeds, widened by the runs' intervals over images);
one seed: the interval over images.

The reading names, per model and chosen block, the first epoch from which the locality ratio
stays below 1 by at least the smallest effect worth a word (localitylab/report/effects.py),
with its interval, or says it never does; and whether the position table ended spatially
ordered (PE Spearman's interval above 0 and the value at least its smallest effect).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from localitylab.report.effects import PE_MOVED_MIN, smallest_effect
from localitylab.report.summary import Estimate, metric_bounds, over_seeds

# (probe, metric, label): the curves drawn, in order; per-layer metrics are drawn at the first and last layer.
CURVES = (("attention-distance", "locality_ratio", "locality ratio (head mean)"),
          ("pe-similarity", "pe_distance_spearman", "PE Spearman"),
          ("pe-similarity", "pe_moved", "|P - P0| / |P0|"),
          ("receptive-field", "erf_r50_px", "ERF r50 (px)"))


@dataclass
class OverTrainingSection:
    figure: Any = None  # report.figures.Figure
    readings: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.readings)


def _points(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The model-level rows of `metric` (per layer: the head mean, head empty), first setting only."""
    rows = table[(table["metric"] == metric) & table["head"].isna()]
    if rows.empty:
        return rows
    settings = rows["setting"].fillna("")
    rows = rows[settings == settings.iloc[0]]
    return rows[["layer", "epoch", "value", "ci_low", "ci_high"]]


def curve(records: list, probe: str, metric: str) -> dict[Any, list[tuple[float, Estimate]]]:
    """{layer (None for a per-model metric): [(epoch, estimate over the group's seeds)]}."""
    per_seed: dict[tuple[Any, float], list[Estimate]] = {}
    for record in records:
        table = record.over_training.get(probe)
        if table is None:
            continue
        for row in _points(table, metric).itertuples(index=False):
            if row.value is None or not math.isfinite(row.value):
                continue
            layer = None if pd.isna(row.layer) else int(row.layer)
            low, high = (None, None) if pd.isna(row.ci_low) else (float(row.ci_low), float(row.ci_high))
            per_seed.setdefault((layer, round(float(row.epoch), 6)), []).append(Estimate(float(row.value), low, high))
    out: dict[Any, list[tuple[float, Estimate]]] = {}
    for (layer, epoch), estimates in sorted(per_seed.items(), key=lambda item: (item[0][0] or -1, item[0][1])):
        out.setdefault(layer, []).append((epoch, over_seeds(estimates, metric_bounds(metric))))
    if metric in ("locality_ratio", "erf_r50_px") and len(out) > 2:  # the first and the last layer
        layers = sorted(k for k in out if k is not None)
        out = {layers[0]: out[layers[0]], layers[-1]: out[layers[-1]]}
    return out


def accuracy_curve(records: list) -> list[tuple[float, Estimate]]:
    per_epoch: dict[float, list[Estimate]] = {}
    for record in records:
        for entry in record.snapshots:
            if entry.get("test_acc") is not None:
                per_epoch.setdefault(round(float(entry["epoch"]), 6), []).append(Estimate(float(entry["test_acc"])))
    return [(epoch, over_seeds(values, (0.0, 1.0))) for epoch, values in sorted(per_epoch.items())]


def _interval(estimate: Estimate) -> str:
    text = f"{estimate.value:.3f}"
    if estimate.has_interval:
        text += f" [{estimate.low:.3f}, {estimate.high:.3f}]"
    return text + (f" over {estimate.seeds} seeds" if estimate.seeds > 1 else "")


def emergence(points: list[tuple[float, Estimate]], effect: float) -> str:
    """When the locality ratio went below 1 for good: by at least `effect`, its interval below 1."""
    def below(e: Estimate) -> bool:
        return e.has_interval and e.high < 1 and 1 - e.value >= effect

    def excludes_one(e: Estimate) -> bool:
        return e.has_interval and e.high < 1

    start, end = points[0], points[-1]
    text = f"{_interval(start[1])} at epoch {start[0]:g}, {_interval(end[1])} at epoch {end[0]:g}; "
    for test, words in ((below, f"below 1 by at least {effect:g}"), (excludes_one, "interval below 1")):
        first = next((i for i in range(len(points)) if all(test(e) for _, e in points[i:])), None)
        if first is not None:
            epoch, estimate = points[first]
            return text + f"{words} from epoch {epoch:g} on ({_interval(estimate)} there)" + (
                "" if test is below else f", but never by the {effect:g} worth a word")
    return text + "never below 1 for good"


def _clearly_above_zero(estimate: Estimate, metric: str) -> bool:
    low = estimate.low if estimate.has_interval else estimate.value
    return low > 0 and estimate.value >= (smallest_effect(metric) or 0.0)


def ordered(points: list[tuple[float, Estimate]], moved: list[tuple[float, Estimate]],
            linear: list[tuple[float, Estimate]] = ()) -> str:
    """The table's reading: PE Spearman at the start and the end; where it is not ordered by
    distance but a linear read-out of position is clearly above 0, that too (a table can tell
    positions apart without its similarity falling with distance)."""
    epoch, end = points[-1]
    effect = smallest_effect("pe_distance_spearman") or 0.0
    low = end.low if end.has_interval else end.value
    if _clearly_above_zero(end, "pe_distance_spearman"):
        verdict = "became spatially ordered"
    elif low > 0:
        verdict = f"became weakly ordered (above 0, below the {effect:g} worth a word)"
    else:
        verdict = "did not become spatially ordered"
    text = f"the position table {verdict}: PE Spearman {_interval(points[0][1])} at epoch {points[0][0]:g}, " \
           f"{_interval(end)} at epoch {epoch:g}"
    if linear and verdict != "became spatially ordered" and _clearly_above_zero(linear[-1][1], "pe_linear_r2"):
        text += (f"; yet position can be read from it: PE linear R² {_interval(linear[-1][1])} at epoch "
                 f"{linear[-1][0]:g} (its similarity does not fall steadily with distance)")
    if moved:
        last = moved[-1][1]
        text += f"; it moved {last.value:.2f} of its start" + (
            f" (under {PE_MOVED_MIN:g}: its scores describe its initialisation)" if last.value < PE_MOVED_MIN else "")
    return text


def over_training_section(groups: list, figure_dir: Path) -> OverTrainingSection:
    """The section's figure and readings; empty (not drawn) when no run has over-training tables."""
    section = OverTrainingSection()
    drawn = [g for g in groups if any(r.over_training for r in g.records)]
    if not drawn:
        return section
    curves = {g.name: {(p, m): curve(g.records, p, m) for p, m, _ in CURVES} for g in drawn}
    accuracy = {g.name: accuracy_curve(g.records) for g in drawn}
    effect = smallest_effect("locality_ratio") or 0.0
    for name, model_curves in curves.items():
        for layer, points in model_curves[("attention-distance", "locality_ratio")].items():
            section.readings.append(f"{name}, block {layer}: locality ratio " + emergence(points, effect) + ".")
        spearman = model_curves[("pe-similarity", "pe_distance_spearman")].get(None)
        if spearman:
            group = next(g for g in drawn if g.name == name)
            linear = curve(group.records, "pe-similarity", "pe_linear_r2").get(None, [])
            section.readings.append(f"{name}: " + ordered(spearman, model_curves[("pe-similarity", "pe_moved")].get(
                None, []), linear) + ".")
    section.figure = _figure(curves, accuracy, figure_dir)
    return section


def _figure(curves: dict, accuracy: dict, figure_dir: Path):
    import matplotlib.pyplot as plt

    from localitylab.plotting import apply_style, model_colours, save_figure
    from localitylab.report.figures import Figure, image_uri

    panels = [(key, label) for *key, label in CURVES if any(c[tuple(key)] for c in curves.values())]
    apply_style()
    colours = model_colours(list(curves))
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3.4 * (len(panels) + 1), 3.2), squeeze=False)
    series = [(ax, {name: c[tuple(key)] for name, c in curves.items()}, label) for ax, (key, label) in
              zip(axes[0], panels)]
    series.append((axes[0][-1], {name: {None: points} for name, points in accuracy.items()}, "test accuracy"))
    for ax, by_model, label in series:
        for name, layers in by_model.items():
            for index, (layer, points) in enumerate(layers.items()):
                epochs = [e for e, _ in points]
                values = [p.value for _, p in points]
                style = "-" if index == len(layers) - 1 else "--"
                ax.plot(epochs, values, style, color=colours[name], marker="o", markersize=3,
                        label=name + ("" if layer is None else f", block {layer}"))
                if all(p.has_interval for _, p in points):
                    ax.fill_between(epochs, [p.low for _, p in points], [p.high for _, p in points],
                                    color=colours[name], alpha=0.2, linewidth=0)
        ax.set(xlabel="epoch", title=label)
        if label.startswith("locality"):
            ax.axhline(1.0, color="grey", linewidth=0.8)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    path = save_figure(fig, figure_dir / "over-training.png")
    caption = ("Probes on every snapshot of each run, on the same images. Bands: 95% intervals, over seeds where a "
               "model has several (t interval widened by the intervals over images), else over images. Dashed: "
               "the first block, solid: the last.")
    return Figure("locality over training", image_uri(path), caption)

"""What a probe measured, and the tidy table it becomes (docs/probes.md, Output schema and
Uncertainty): rows of values per image, statistics of the images or single values, their
95% percentile-bootstrap intervals over images, and the columns a report reads from a table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

# The tidy schema of docs/probes.md: one measurement per row.
COLUMNS = ("model", "probe", "metric", "layer", "head", "setting", "value", "ci_low", "ci_high", "n_images", "note")

# 95% percentile-bootstrap intervals over images (docs/probes.md, Uncertainty).
CONFIDENCE = 0.95
RESAMPLES = 2000
# Resampled values held at once while bootstrapping (rows x resamples x images), in float64.
BOOTSTRAP_ELEMENTS = 2**23

# resample(indices) -> statistics: indices (B, n) of B resamples of the n images -> (k, B) values,
# one row per statistic that shares the resamples.
Resample = Callable[[np.ndarray], np.ndarray]


@dataclass
class Measurement:
    """One row of the table: a mean over images (with an interval over them), a statistic of
    the images whose interval comes from resampling them, or one value with no interval."""

    metric: str
    layer: int | None
    head: int | None
    setting: str | None
    note: str
    per_image: np.ndarray | None = None  # float64 (n,) or (draws, n); NaN = no value for that image
    single: float | None = None  # a value that is not a mean over images
    n_images: int | None = None  # for a single value or a statistic: how many images it rests on
    resample: Resample | None = None  # for a statistic: its value on resampled images (row `output` of them)
    output: int = 0
    interval: tuple[float, float] | None = None

    @property
    def values(self) -> np.ndarray:
        """The per-image values that exist (images with NaN dropped); (n,) or (draws, n)."""
        assert self.per_image is not None
        keep = ~np.isnan(self.per_image).any(axis=0) if self.per_image.ndim == 2 else ~np.isnan(self.per_image)
        return self.per_image[..., keep]

    @property
    def value(self) -> float | None:
        if self.per_image is None:
            return None if self.single is None or math.isnan(self.single) else float(self.single)
        values = self.values
        return float(values.mean()) if values.size else None

    @property
    def count(self) -> int | None:
        return self.values.shape[-1] if self.per_image is not None else self.n_images


class Measurements:
    """Rows in the order a probe adds them.

    - `per_image`: a mean over images of one value per image; its interval is the percentile
      bootstrap of that mean. Paired comparisons (an accuracy drop) pass the per-image
      differences. A 2-D (draws, images) array is a setting drawn at random several times:
      draws and images are resampled together.
    - `statistic`: a value that is not a mean (a radius of a mean map, a ratio of means),
      with a function giving it on resampled images; the same bootstrap gives its interval.
    - `single`: anything else (a property of the weights, a geometry-only reference): no
      interval over images.

    While `level` is set (a denoiser's noise level, 't=500'), every row's setting starts with it.
    """

    def __init__(self) -> None:
        self.rows: list[Measurement] = []
        self.level: str | None = None
        # Run once every interval exists: rows whose value depends on another row's interval
        # (order dependence is empty where clean accuracy's interval includes chance).
        self.checks: list[Callable[[], None]] = []

    def _setting(self, setting: str | None) -> str | None:
        if self.level is None:
            return setting
        return f"{self.level}, {setting}" if setting else self.level

    def per_image(self, metric: str, values: torch.Tensor | np.ndarray | list, layer: int | None = None,
                  head: int | None = None, setting: str | None = None, note: str = "") -> None:
        array = values.detach().double().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        array = array.astype(np.float64)
        self.rows.append(Measurement(metric, layer, head, self._setting(setting), note,
                                     per_image=array if array.ndim == 2 else array.ravel()))

    def statistics(self, rows: list[dict[str, Any]], resample: Resample, n_images: int) -> None:
        """Rows whose values are statistics of the same n images (not means): each dict has
        the row's metric, value and optionally layer, head, setting, note; `resample(indices)`
        gives all of them, in that order, on resampled images."""
        for output, row in enumerate(rows):
            value = row.get("value")
            self.rows.append(Measurement(row["metric"], row.get("layer"), row.get("head"),
                                         self._setting(row.get("setting")), row.get("note", ""),
                                         single=None if value is None else float(value),
                                         n_images=n_images, resample=resample, output=output))

    def single(self, metric: str, value: float | None, layer: int | None = None, head: int | None = None,
               setting: str | None = None, note: str = "", n_images: int | None = None) -> None:
        self.rows.append(Measurement(metric, layer, head, self._setting(setting), note,
                                     single=None if value is None else float(value), n_images=n_images))

    def add_intervals(self, seed: int) -> None:
        """The 95% interval of every row that has one, from one generator seeded by `seed`."""
        rng = np.random.default_rng(seed)
        means = [row for row in self.rows if row.per_image is not None and row.per_image.ndim == 1]
        for count, rows in _same_images(means):
            if count >= 2:
                _mean_intervals(rows, rng)
        shared: dict[int, list[Measurement]] = {}
        for row in self.rows:
            if row.per_image is not None and row.per_image.ndim == 2 and row.count >= 2:
                row.interval = _drawn_interval(row.values, rng)
            elif row.resample is not None and row.n_images >= 2:
                shared.setdefault(id(row.resample), []).append(row)
        for rows in shared.values():
            resample = rows[0].resample
            low, high = _bootstrap((np.arange(rows[0].n_images),), lambda indices, axis=-1: resample(indices), rng,
                                   len(rows))
            for row in rows:
                lo, hi = np.atleast_1d(low)[row.output], np.atleast_1d(high)[row.output]
                if row.value is not None and np.isfinite(lo) and np.isfinite(hi):
                    row.interval = (float(lo), float(hi))
        for check in self.checks:
            check()

    def to_frame(self, model: str, probe: str) -> pd.DataFrame:
        records = [{
            "model": model, "probe": probe, "metric": row.metric, "layer": row.layer, "head": row.head,
            "setting": row.setting or "", "value": row.value,
            "ci_low": row.interval[0] if row.interval else None, "ci_high": row.interval[1] if row.interval else None,
            "n_images": row.count, "note": row.note or "",
        } for row in self.rows]
        return typed_frame(pd.DataFrame.from_records(records, columns=list(COLUMNS)))


def _same_images(rows: list[Measurement]) -> list[tuple[int, list[Measurement]]]:
    """Rows grouped by which images have a value, so each group is bootstrapped at once."""
    groups: dict[bytes, list[Measurement]] = {}
    for row in rows:
        groups.setdefault(np.isnan(row.per_image).tobytes() + bytes(len(row.per_image)), []).append(row)
    return [(rows[0].count, rows) for rows in groups.values()]


def _bootstrap(data: tuple[np.ndarray, ...], statistic: Callable, rng: np.random.Generator,
               rows: int = 1) -> tuple[np.ndarray, np.ndarray]:
    from scipy.stats import bootstrap

    size = max(len(d) for d in data)
    batch = max(1, min(RESAMPLES, BOOTSTRAP_ELEMENTS // max(1, rows * size)))
    result = bootstrap(data, statistic, n_resamples=RESAMPLES, batch=batch, vectorized=True, axis=-1,
                       paired=False, confidence_level=CONFIDENCE, method="percentile", random_state=rng)
    return result.confidence_interval.low, result.confidence_interval.high


def _mean_intervals(rows: list[Measurement], rng: np.random.Generator) -> None:
    """Every row of a group at once: the same resampled images for all of them."""
    matrix = np.stack([row.values for row in rows])  # (rows, n)
    low, high = _bootstrap((matrix,), lambda sample, axis=-1: sample.mean(axis=axis), rng, len(rows))
    for row, lo, hi in zip(rows, np.atleast_1d(low), np.atleast_1d(high)):
        row.interval = (float(lo), float(hi))


def _drawn_interval(values: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """A (draws, images) mean whose draws and images are resampled independently (one draw:
    the images alone, as for any mean over images)."""
    if values.shape[0] < 2:
        low, high = _bootstrap((values[0],), lambda sample, axis=-1: sample.mean(axis=axis), rng)
        return float(low), float(high)

    def mean(draws: np.ndarray, images: np.ndarray, axis: int = -1) -> np.ndarray:
        return values[draws[..., :, None], images[..., None, :]].mean(axis=(-2, -1))

    low, high = _bootstrap((np.arange(values.shape[0]), np.arange(values.shape[1])), mean, rng, values.shape[0])
    return float(low), float(high)


def typed_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The schema's types: nullable integers for layer, head, n_images; float64 numbers."""
    for column in ("layer", "head", "n_images"):
        frame[column] = frame[column].astype("Int64")
    for column in ("value", "ci_low", "ci_high"):
        frame[column] = frame[column].astype("float64")
    return frame


# --- what a report reads from a probe's table ----------------------------------------------
@dataclass(frozen=True)
class SummaryColumn:
    """A column of the report's summary that comes from one probe's table.

    The value is the rows of `metric` (and `setting`), at the first or last `layer` when
    given, averaged (over heads). `better` says which direction means "more local";
    `sentence`, when set, is how the report names the model that ranks first.
    """

    key: str
    label: str
    help: str
    metric: str
    layer: str | None = None  # 'first' | 'last' | None
    setting: str | None = None
    better: str = ""  # 'low' | 'high' | ''
    kind: str = "float"
    sentence: str = ""
    skip_tasks: tuple[str, ...] = ()  # runs of these tasks show no value (an MAE encoder's untrained head)
    probe: str = ""  # filled in by the probe that declares it

    def read(self, table: pd.DataFrame | None) -> tuple[float, float | None, float | None] | None:
        """(value, ci_low, ci_high) from one probe table, or None where it has no such row.
        At a chosen layer the head-mean row (head empty) carries the interval; tables from
        before such rows existed give the mean over heads, without one."""
        if table is None:
            return None
        rows = table[(table["metric"] == self.metric) & table["value"].notna()]
        if self.setting is not None:
            rows = rows[rows["setting"] == self.setting]
        if rows.empty:
            return None
        if self.layer is not None:
            layer = rows["layer"].min() if self.layer == "first" else rows["layer"].max()
            rows = rows[rows["layer"] == layer]
            whole = rows[rows["head"].isna()]
            if whole.empty:
                return float(rows["value"].mean()), None, None
            rows = whole
        row = rows.iloc[0]
        interval = [None if pd.isna(row.get(k)) else float(row[k]) for k in ("ci_low", "ci_high")]
        return float(row["value"]), interval[0], interval[1]

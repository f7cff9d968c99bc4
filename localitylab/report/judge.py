"""What a reader may be told about a model's numbers (docs/probes.md, "Reading the numbers").

- Chance: a classifier whose clean test accuracy's 95% interval includes 1 / classes is
  "at chance"; the report marks it everywhere and ranks it nowhere.
- Does not apply / missing: a probe that ran and wrote an empty value says why ("does not
  apply"); a probe that never ran is "missing", with the command that produces it.
- Cells name the setting (a denoiser's noise level) they quote, so a headline and the table
  quote the same number of the same row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from localitylab.report.collect import RunRecord


@dataclass(frozen=True)
class Chance:
    """A model's clean accuracy against chance (1 / classes)."""

    chance: float
    value: float
    low: float | None
    high: float | None

    @property
    def at_chance(self) -> bool:
        return self.low is not None and self.high is not None and self.low <= self.chance <= self.high

    @property
    def headroom(self) -> float:
        return self.value - self.chance


def classes(record: RunRecord) -> int | None:
    count = record.spec.get("num_classes")
    return int(count) if count else None


def clean_accuracy(record: RunRecord) -> tuple[float, float | None, float | None] | None:
    """The permutation probe's clean accuracy with its interval over images, else the
    run's final test accuracy (no interval: chance cannot be judged from it)."""
    table = record.tables.get("permutation")
    if table is not None:
        rows = table[(table["metric"] == "accuracy") & (table["setting"] == "clean") & table["value"].notna()]
        if not rows.empty:
            row = rows.iloc[0]
            low, high = (None if pd.isna(row[k]) else float(row[k]) for k in ("ci_low", "ci_high"))
            return float(row["value"]), low, high
    return (record.accuracy, None, None) if record.accuracy is not None else None


def chance_of(records: list[RunRecord]) -> Chance | None:
    """Chance for a model (several seeds: the mean clean accuracy and the widest interval
    of its runs, so a group is at chance when any seed's interval reaches chance)."""
    found = [(clean_accuracy(r), classes(r)) for r in records if r.config.get("task", "classify") == "classify"]
    found = [(acc, n) for acc, n in found if acc is not None and n]
    if not found:
        return None
    values = [acc[0] for acc, _ in found]
    lows = [acc[1] for acc, _ in found if acc[1] is not None]
    highs = [acc[2] for acc, _ in found if acc[2] is not None]
    return Chance(1 / found[0][1], sum(values) / len(values), min(lows) if lows else None, max(highs) if highs else None)


def read_cell(column, table: pd.DataFrame | None) -> tuple[tuple[float, float | None, float | None], str] | None:
    """(value, low, high) and the setting of the row a summary column quotes (as
    SummaryColumn.read picks it), so the text can name a denoiser's noise level."""
    read = column.read(table)
    if read is None:
        return None
    rows = table[(table["metric"] == column.metric) & table["value"].notna()]
    if column.setting is not None:
        rows = rows[rows["setting"] == column.setting]
    if column.layer is not None:
        rows = rows[rows["layer"] == (rows["layer"].min() if column.layer == "first" else rows["layer"].max())]
        rows = rows[rows["head"].isna()] if rows["head"].isna().any() else rows
    setting = rows.iloc[0]["setting"] if not rows.empty else None
    return read, ("" if setting is None or pd.isna(setting) or column.setting is not None else str(setting))


def not_applicable_reason(column, record: RunRecord) -> str | None:
    """Why a probe that ran has no value for this column (its rows' note), or None where the
    probe never ran (then the value is missing, not inapplicable)."""
    if record.config.get("task") in getattr(column, "skip_tasks", ()):
        return f"a {record.config.get('task')} run has no classifier head to measure"
    table = record.tables.get(column.probe)
    if table is None:
        return None
    notes = table["note"].dropna().astype(str)
    empty = table[table["value"].isna()]["note"].dropna().astype(str)
    reason = next(iter(empty), None) or next(iter(notes), None)
    return reason or f"{column.probe} wrote no {column.metric} for this model"


def zero_width(estimate) -> bool:
    """An interval of zero width: the value cannot change with the images (a radius fixed by
    the patch geometry, a value of the weights)."""
    return estimate is not None and estimate.has_interval and math.isclose(estimate.low, estimate.high, abs_tol=1e-12)

"""The small base every probe shares, in the spirit of pytorch-grad-cam: the base holds the
loading, the schema and the writing; each probe is a short subclass that overrides
`measure` (and `plot`, for its figures)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import torch

from localitylab.probes.target import ProbeTarget

# The tidy schema of PROBES.md: one measurement per row.
COLUMNS = ("model", "probe", "metric", "layer", "head", "setting", "value", "n_images", "note")


@dataclass
class Row:
    metric: str
    value: float | None
    layer: int | None = None
    head: int | None = None
    setting: str | None = None
    note: str = ""
    n_images: int | None = None  # defaults to the probe's image count


@dataclass
class ProbeContext:
    """What a probe is given besides the model: the images and the options."""

    images: torch.Tensor  # uint8 (N, C, H, W), a seeded subset of the test split
    labels: torch.Tensor
    batch_size: int = 64
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return len(self.images)

    def option(self, key: str, default: Any) -> Any:
        return self.options.get(key, default)


class Probe:
    """Subclasses set `name`, `summary`, `applies_to` and override `measure`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    applies_to: ClassVar[str] = "every model"
    # Option names this probe reads from ProbeContext.options (checked, so a typo is an error).
    option_names: ClassVar[tuple[str, ...]] = ()

    def not_applicable(self, target: ProbeTarget) -> str | None:
        """Why this probe does not apply to `target`, or None if it does."""
        return None

    def check_options(self, options: dict[str, Any]) -> None:
        """Raise UserError for an option value this probe cannot use; needs no model, so
        studies check their files with it and the runner checks before anything is written."""

    def check(self, target: ProbeTarget, context: ProbeContext) -> None:
        """Raise UserError for an option that does not fit `target` (e.g. a query pixel outside
        its image). Called for every probe of a run before any output is written."""
        self.check_options(context.options)

    def measure(self, target: ProbeTarget, context: ProbeContext) -> list[Row]:
        raise NotImplementedError

    def plot(self, tables: list[pd.DataFrame], out_dir: Path) -> list[Path]:
        """Figures from one or more of this probe's tables (several models overlaid)."""
        return []

    def artifacts(self, target: ProbeTarget, context: ProbeContext, out_dir: Path) -> list[Path]:
        """Figures that need the model itself (e.g. attention maps over images)."""
        return []

    # --- shared -----------------------------------------------------------------------------
    def table(self, target: ProbeTarget, context: ProbeContext) -> pd.DataFrame:
        reason = self.not_applicable(target)
        rows = [Row("applies", None, note=reason)] if reason else self.measure(target, context)
        return to_frame(rows, target.display_name, self.name, context.n_images)


def to_frame(rows: list[Row], model: str, probe: str, n_images: int) -> pd.DataFrame:
    records = []
    for row in rows:
        value = row.value
        if value is not None:
            value = float(value)
            if math.isnan(value):
                value = None
        records.append({
            "model": model, "probe": probe, "metric": row.metric,
            "layer": row.layer, "head": row.head, "setting": row.setting or "",
            "value": value, "n_images": row.n_images if row.n_images is not None else n_images, "note": row.note or "",
        })
    frame = pd.DataFrame.from_records(records, columns=list(COLUMNS))
    for column in ("layer", "head", "n_images"):
        frame[column] = frame[column].astype("Int64")  # integers with empty cells
    frame["value"] = frame["value"].astype("float64")
    return frame

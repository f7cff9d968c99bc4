"""The base every probe shares, in the spirit of pytorch-grad-cam's `BaseCAM`: the base owns
the pipeline, a probe says what it measures per image.

The base owns: the options (one typed parse, `Probe.Options`), the images and their
batching and preparation (`ProbeInputs.batches`), collecting what was measured as values
per image (`Measurements`), turning those into the tidy table (PROBES.md, Output schema),
and handing the same result to the table and to the figures, so no probe runs the model
twice. A probe subclass sets its name, its `Options`, its `summary_columns` (what the
report's summary reads from its table), and overrides `measure` (and `figures` / `plot`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from localitylab.errors import UserError
from localitylab.settings import Settings, parse_settings

if TYPE_CHECKING:
    from localitylab.probes.target import ProbeTarget

# The tidy schema of PROBES.md: one measurement per row.
COLUMNS = ("model", "probe", "metric", "layer", "head", "setting", "value", "n_images", "note")


class NoOptions(Settings):
    """A probe that takes no options."""


# --- what a probe measured ------------------------------------------------------------------
@dataclass
class Measurement:
    """One row of the table: a value per image (the row's value is their mean), or one value."""

    metric: str
    layer: int | None
    head: int | None
    setting: str | None
    note: str
    per_image: np.ndarray | None = None  # float64 (n,); NaN = no value for that image
    single: float | None = None  # a value that is not a mean over images
    n_images: int | None = None  # for a single value: how many images it rests on

    @property
    def values(self) -> np.ndarray:
        """The per-image values that exist (NaN dropped)."""
        assert self.per_image is not None
        return self.per_image[~np.isnan(self.per_image)]

    @property
    def value(self) -> float | None:
        if self.per_image is None:
            return None if self.single is None or math.isnan(self.single) else float(self.single)
        values = self.values
        return float(values.mean()) if len(values) else None

    @property
    def count(self) -> int | None:
        return len(self.values) if self.per_image is not None else self.n_images


class Measurements:
    """Rows in the order a probe adds them: `per_image` for a mean over images, `single`
    for anything else (a property of the weights, a geometry-only reference). While `level`
    is set (a denoiser's noise level, 't=500'), every row's setting starts with it."""

    def __init__(self) -> None:
        self.rows: list[Measurement] = []
        self.level: str | None = None

    def _setting(self, setting: str | None) -> str | None:
        if self.level is None:
            return setting
        return f"{self.level}, {setting}" if setting else self.level

    def per_image(self, metric: str, values: torch.Tensor | np.ndarray | list, layer: int | None = None,
                  head: int | None = None, setting: str | None = None, note: str = "") -> None:
        array = values.detach().double().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        self.rows.append(Measurement(metric, layer, head, self._setting(setting), note,
                                     per_image=array.astype(np.float64).ravel()))

    def single(self, metric: str, value: float | None, layer: int | None = None, head: int | None = None,
               setting: str | None = None, note: str = "", n_images: int | None = None) -> None:
        self.rows.append(Measurement(metric, layer, head, self._setting(setting), note,
                                     single=None if value is None else float(value), n_images=n_images))

    def to_frame(self, model: str, probe: str) -> pd.DataFrame:
        records = [{
            "model": model, "probe": probe, "metric": row.metric, "layer": row.layer, "head": row.head,
            "setting": row.setting or "", "value": row.value, "n_images": row.count, "note": row.note or "",
        } for row in self.rows]
        return typed_frame(pd.DataFrame.from_records(records, columns=list(COLUMNS)))


def typed_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The schema's types: nullable integers for layer, head, n_images; float64 values."""
    for column in ("layer", "head", "n_images"):
        frame[column] = frame[column].astype("Int64")
    frame["value"] = frame["value"].astype("float64")
    return frame


# --- what a probe is given ------------------------------------------------------------------
@dataclass
class Batch:
    start: int  # index of the first image of the batch among the probe's images
    images: torch.Tensor  # uint8, on the target's device
    labels: torch.Tensor
    inputs: torch.Tensor  # prepared: what the model takes (for a denoiser: noised to `timesteps`)
    timesteps: torch.Tensor | None = None  # a denoiser's noise level, one per image; None for a classifier

    def __len__(self) -> int:
        return len(self.images)

    def model_args(self) -> tuple[torch.Tensor, ...]:
        """What the model is called with: the inputs, and for a denoiser the noise level and
        the images' own labels as its condition (no guidance)."""
        return (self.inputs,) if self.timesteps is None else (self.inputs, self.timesteps, self.labels)


@dataclass
class ProbeInputs:
    """The model and the images a probe runs on, with its parsed options."""

    target: "ProbeTarget"
    images: torch.Tensor  # uint8 (N, C, H, W), a seeded subset of the test split
    labels: torch.Tensor
    options: Settings
    batch_size: int = 64
    seed: int = 0
    timestep: int | None = None  # a denoiser's noise level the images are taken to

    @property
    def n_images(self) -> int:
        return len(self.images)

    def batches(self, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                count: int | None = None) -> Iterator[Batch]:
        """The first `count` images (all by default) in batches, prepared for the model;
        `transform(uint8 batch) -> uint8 batch` is applied before the preparation."""
        device = self.target.device
        end = self.n_images if count is None else min(count, self.n_images)
        for start in range(0, end, self.batch_size):
            stop = min(start + self.batch_size, end)
            images = self.images[start:stop].to(device)
            if transform is not None:
                images = transform(images)
            inputs, labels, timesteps = self.target.prepare(images), self.labels[start:stop].to(device), None
            if self.timestep is not None:
                inputs, timesteps = self.target.denoising.noised(inputs, self.timestep, self.seed, start)
            yield Batch(start, images, labels, inputs, timesteps)


@dataclass
class ProbeResult:
    """One probe's result on one model: its table and what its figures are drawn from."""

    probe: str
    table: pd.DataFrame
    applies: bool
    drawing: Any = None  # whatever `figures` needs (maps, tables of weights); None when it does not apply
    level_drawings: dict[int, Any] = field(default_factory=dict)  # a denoiser's: one drawing per noise level


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

    def read(self, table: pd.DataFrame | None) -> float | None:
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
            return float(rows["value"].mean())
        return float(rows["value"].iloc[0])


# --- the probe ------------------------------------------------------------------------------
class Probe:
    """Subclasses set `name`, `summary`, `applies_to`, `Options`, `summary_columns` and
    override `measure`; `figures` draws per-model figures from what `measure` returned,
    `plot` draws figures that overlay several models' tables."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    applies_to: ClassVar[str] = "every model"
    Options: ClassVar[type[Settings]] = NoOptions
    summary_columns: ClassVar[tuple[SummaryColumn, ...]] = ()
    # How the probe reads a denoiser (a DiT: `target.denoising` set): 'per-level' measures
    # once per noise level (`timesteps`, PROBES.md), 'weights' once (it reads the weights
    # alone); None: it does not apply, and `denoiser_reason` says why.
    on_denoiser: ClassVar[str | None] = None
    denoiser_reason: ClassVar[str] = "it reads a classifier's prediction"

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(cls.Options.model_fields)

    def parse_options(self, options: Mapping[str, Any] | Settings | None = None) -> Settings:
        """The typed options; raises UserError naming the first bad one (no model needed)."""
        if isinstance(options, self.Options):
            return options
        return parse_settings(self.Options, dict(options or {}), "--opt")

    def not_applicable(self, target: "ProbeTarget") -> str | None:
        """Why this probe does not apply to `target`, or None if it does (subclasses that add
        reasons of their own ask this one first)."""
        if target.denoising is not None and self.on_denoiser is None:
            return f"{target.spec.name} is a denoiser and {self.name} does not apply to one: {self.denoiser_reason}"
        return None

    def check(self, target: "ProbeTarget", options: Settings) -> None:
        """Raise UserError for an option that does not fit `target` (e.g. a query pixel outside
        its image). Called for every probe of a run before any output is written."""

    def measure(self, inputs: ProbeInputs, out: Measurements) -> Any:
        """Add this probe's rows to `out`; return what `figures` draws (or None)."""
        raise NotImplementedError

    def figures(self, target: "ProbeTarget", drawing: Any, out_dir: Path) -> list[Path]:
        """Per-model figures, from what `measure` returned."""
        return []

    def plot(self, tables: list[pd.DataFrame], out_dir: Path) -> list[Path]:
        """Figures from one or more of this probe's tables (several models overlaid)."""
        return []

    # --- the pipeline ---------------------------------------------------------------------
    def run(self, target: "ProbeTarget", images: torch.Tensor, labels: torch.Tensor,
            options: Mapping[str, Any] | Settings | None = None, batch_size: int = 64, seed: int = 0,
            timesteps: Sequence[int] | None = None) -> ProbeResult:
        """Measure `target` on uint8 `images`: the table, and what the figures are drawn from.
        A denoiser is measured at each noise level of `timesteps` (its defaults when None),
        the rows of level t with `setting` 't=<t>', and the figures drawn per level."""
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {batch_size}")
        parsed = self.parse_options(options)
        out = Measurements()
        reason = self.not_applicable(target)
        drawing, level_drawings = None, {}
        if reason:
            out.single("applies", None, note=reason, n_images=len(images))
        elif target.denoising is not None and self.on_denoiser == "per-level":
            self.check(target, parsed)
            for timestep in target.denoising.levels(timesteps):
                out.level = f"t={timestep}"
                level_drawings[timestep] = self.measure(
                    ProbeInputs(target, images, labels, parsed, batch_size, seed, timestep), out)
            out.level = None
        else:
            self.check(target, parsed)
            drawing = self.measure(ProbeInputs(target, images, labels, parsed, batch_size, seed), out)
        return ProbeResult(self.name, out.to_frame(target.display_name, self.name), not reason, drawing,
                           level_drawings)


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

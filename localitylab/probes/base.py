"""The base every probe shares, in the spirit of pytorch-grad-cam's `BaseCAM`: the base owns
the pipeline, a probe says what it measures per image.

The base owns: the settings (`ProbeSettings`, and the probe's own `Options`, one typed parse:
localitylab/probes/settings.py), the images and their batching and preparation
(`ProbeInputs.batches`, with gradients where a probe differentiates), collecting what was
measured as values per image (`Measurements`, localitylab/probes/measurements.py), turning
those into the tidy table, and handing the same result to the table and to the figures, so no
probe runs the model twice. A probe subclass sets its name, its `Options`, its
`summary_columns` (what the report's summary reads from its table), and overrides `measure`
(and `figures` / `plot`, which call localitylab/plotting/probes.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Mapping, Sequence

import pandas as pd
import torch

from localitylab.errors import UserError
from localitylab.probes.measurements import (COLUMNS, Measurement, Measurements, SummaryColumn,  # noqa: F401
                                             typed_frame)
from localitylab.probes.settings import ProbeSettings, checked
from localitylab.progress import SILENT, Progress, Task
from localitylab.settings import Settings

if TYPE_CHECKING:
    from localitylab.probes.target import ProbeTarget

class NoOptions(Settings):
    """A probe that takes no options."""


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
    batch_size: int = ProbeSettings.model_fields["batch_size"].default
    seed: int = ProbeSettings.model_fields["seed"].default
    timestep: int | None = None  # a denoiser's noise level the images are taken to
    task: Task = field(default_factory=Task)  # advanced after each batch (progress)

    @property
    def n_images(self) -> int:
        return len(self.images)

    def batches(self, transform: Callable[[torch.Tensor], torch.Tensor] | None = None, count: int | None = None,
                prepared: Callable[[torch.Tensor], torch.Tensor] | None = None,
                gradients: bool = False) -> Iterator[Batch]:
        """The first `count` images (all by default) in batches, prepared for the model;
        `transform(uint8 batch) -> uint8 batch` is applied before the preparation,
        `prepared(inputs) -> inputs` after it. With `gradients`, each batch's inputs are a
        leaf that requires a gradient, and the batch is made with gradients enabled."""
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
            if prepared is not None:
                inputs = prepared(inputs)
            if gradients:
                inputs = inputs.detach().clone().requires_grad_(True)
            with torch.enable_grad() if gradients else contextlib.nullcontext():
                yield Batch(start, images, labels, inputs, timesteps)
            self.task.advance()


@dataclass
class ProbeResult:
    """One probe's result on one model: its table and what its figures are drawn from."""

    probe: str
    table: pd.DataFrame
    applies: bool
    drawing: Any = None  # whatever `figures` needs (maps, tables of weights); None when it does not apply
    level_drawings: dict[int, Any] = field(default_factory=dict)  # a denoiser's: one drawing per noise level


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
    needs_labels: ClassVar[bool] = False  # measures against the images' labels (accuracies)
    # How the probe reads a denoiser (a DiT: `target.denoising` set): 'per-level' measures
    # once per noise level (`timesteps`, docs/probes.md), 'weights' once (it reads the weights
    # alone); None: it does not apply, and `denoiser_reason` says why.
    on_denoiser: ClassVar[str | None] = None
    denoiser_reason: ClassVar[str] = "it reads a classifier's prediction"
    # Images measured when the user names no count: a seeded subset of the test split, or
    # (None) the whole split up to `max_default_images`.
    default_images: ClassVar[int | None] = 128
    max_default_images: ClassVar[int] = 2048

    @classmethod
    def images_for(cls, test_images: int) -> int:
        """How many test images this probe measures by default."""
        wanted = cls.max_default_images if cls.default_images is None else cls.default_images
        return min(wanted, test_images)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(cls.Options.model_fields)

    def parse_options(self, options: Mapping[str, Any] | Settings | None = None) -> Settings:
        """The typed options; raises UserError naming the first bad one (no model needed)."""
        if isinstance(options, self.Options):
            return options
        return checked(self.Options, dict(options or {}))

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
            options: Mapping[str, Any] | Settings | None = None, batch_size: int | None = None, seed: int | None = None,
            timesteps: Sequence[int] | None = None, settings: ProbeSettings | None = None,
            progress: Progress = SILENT) -> ProbeResult:
        """Measure `target` on uint8 `images`: the table, and what the figures are drawn from.
        `settings` (or `batch_size`, `seed`, `timesteps` given alone; ProbeSettings' defaults for
        the rest) say how. A denoiser is measured at each noise level of `timesteps` (its
        defaults when None), the rows of level t with `setting` 't=<t>', and the figures drawn
        per level. `progress` counts the batches measured."""
        if settings is None:
            given = {"batch_size": batch_size, "seed": seed, "timesteps": timesteps}
            settings = checked(ProbeSettings, {k: v for k, v in given.items() if v is not None})
        batch_size, seed, timesteps = settings.batch_size, settings.seed, settings.timesteps
        parsed = self.parse_options(options)
        out = Measurements()
        reason = self.not_applicable(target)
        drawing, level_drawings = None, {}
        if reason:
            out.single("applies", None, note=reason, n_images=len(images))
        elif target.denoising is not None and self.on_denoiser == "per-level":
            self.check(target, parsed)
            with progress.task(f"{self.name} (batches)") as task:
                for timestep in target.denoising.levels(timesteps):
                    out.level = f"t={timestep}"
                    level_drawings[timestep] = self.measure(
                        ProbeInputs(target, images, labels, parsed, batch_size, seed, timestep, task), out)
            out.level = None
            out.add_intervals(seed)
        else:
            self.check(target, parsed)
            with progress.task(f"{self.name} (batches)") as task:
                drawing = self.measure(ProbeInputs(target, images, labels, parsed, batch_size, seed, task=task), out)
            out.add_intervals(seed)
        return ProbeResult(self.name, out.to_frame(target.display_name, self.name), not reason, drawing,
                           level_drawings)


# --- the settings of one run of several probes -----------------------------------------------
# Here rather than in settings.py: the parse asks each Probe for its Options, and settings.py
# sits below the Probe.
@dataclass
class ProbeRun:
    """Checked settings of one run of several probes: the common ones and each probe's options."""

    settings: ProbeSettings
    options: list[Settings]  # one per probe, in the order given
    given: dict[str, Any]  # the probe options as given (for meta.json)


def parse_probe_settings(probes: Sequence[Probe], values: Mapping[str, Any]) -> ProbeRun:
    """Split `values` into ProbeSettings and each probe's options and check them all (no model
    needed). An unknown key, or a value a probe cannot use, is a UserError naming the setting."""
    common = {k: v for k, v in values.items() if k in ProbeSettings.model_fields}
    given = {k: v for k, v in values.items() if k not in ProbeSettings.model_fields}
    known = {name for probe in probes for name in probe.option_names()}
    unknown = sorted(set(given) - known)
    if unknown:
        valid = [*ProbeSettings.model_fields, *sorted(known)]
        raise UserError(f"unknown setting {unknown[0]!r} for {', '.join(p.name for p in probes)}; valid: "
                        f"{', '.join(valid)}", settings=(unknown[0], *valid))
    settings = checked(ProbeSettings, common)
    options = [probe.parse_options({k: v for k, v in given.items() if k in probe.option_names()}) for probe in probes]
    return ProbeRun(settings, options, given)

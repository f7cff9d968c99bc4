"""Run probes on one model and write their outputs.

For each probe: `<out>/<probe>.csv` (and `.parquet` where pyarrow is installed), its
figures beside it, and an entry in `<out>/meta.json` recording the model spec, data, seed,
versions, the command and the code's git commit. `<out>` is `<run folder>/probes/` for a
checkpoint, or the request's `out`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from localitylab.data.registry import DataOptions
from localitylab.io import check_folder, make_folder
from localitylab.probes.base import ProbeRun, parse_probe_settings
from localitylab.probes.output import ProbeOutput, record_meta, write_table
from localitylab.probes.over_training import run_over_training
from localitylab.probes.registry import get_probe, probe_names
from localitylab.probes.settings import ProbeSettings
from localitylab.probes.sources import load_target, select_images
from localitylab.probes.target import ProbeTarget, check_timesteps
from localitylab.progress import SILENT, Progress


@dataclass
class ProbeRequest:
    """One model to probe and how. The probe settings (`n_images`, `batch_size`, `device`,
    `seed`, `timesteps` and the probes' `options`) left None take ProbeSettings' defaults and
    the probes' own (localitylab/probes/settings.py)."""

    source: str
    data: str | None = None
    data_dir: str | None = None
    img_size: int | None = None
    n_images: int | None = None  # None: each probe's own default (`Probe.default_images`)
    batch_size: int | None = None
    device: str | None = None
    seed: int | None = None
    out: Path | None = None
    model_kw: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    pretrained: bool = False  # timm: models: timm's own pretrained weights (the hub, through its cache)
    pos_embed: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    label: str | None = None  # shown after the model's name in the tables ('<model> (<label>)'), as a run folder is
    timesteps: list[int] | None = None  # a denoiser's noise levels (None: its defaults)
    over_training: bool | None = None  # every snapshot of the run (localitylab/probes/over_training.py)

    def settings_for(self, probes: list) -> ProbeRun:
        """The checked settings of every probe; a bad value is a UserError naming it (no model needed)."""
        given = {name: getattr(self, name) for name in ProbeSettings.model_fields if getattr(self, name) is not None}
        return parse_probe_settings(probes, {**self.options, **given})


def run_probes(names: list[str], request: ProbeRequest, progress: Progress = SILENT) -> list[ProbeOutput]:
    """Run the named probes ('all' for every registered one) on one model; `progress` counts
    the probes and each probe's batches."""
    if names == ["all"]:
        names = probe_names()
    probes = [get_probe(name) for name in names]
    run = request.settings_for(probes)
    settings = run.settings
    if request.out is not None:
        check_folder(request.out)
    if settings.over_training:
        return run_over_training(probes, request, run)
    data_options = DataOptions(data_dir=Path(request.data_dir) if request.data_dir else None,
                               img_size=request.img_size, seed=settings.seed)
    target, dataset = load_target(request.source, settings.device, request.data, data_options, request.model_kw,
                                  request.weights, request.pos_embed, settings.seed, request.pretrained)
    counts = [settings.n_images if settings.n_images is not None else probe.images_for(len(dataset.test_images))
              for probe in probes]
    # One seeded order of the test split: each probe's images are its first `count` (nested sets).
    images, labels = select_images(dataset, max(counts), settings.seed)
    images = target.model_images(images)  # a model with its own pipeline: resized as its weights expect
    if request.label:
        target.display_name = f"{target.display_name} ({request.label})"
    check_timesteps(target, settings.timesteps)
    for probe, parsed in zip(probes, run.options):  # every option is checked before anything is written
        if probe.not_applicable(target) is None:
            probe.check(target, parsed)
    out_dir = make_folder(Path(request.out) if request.out is not None else target.default_out_dir())
    outputs = []
    with progress.task(f"probes on {target.display_name}", total=len(probes)) as task:
        for probe, parsed, count in zip(probes, run.options, counts):
            outputs.append(_run_one(probe, parsed, count, target, images, labels, run, dataset.name, out_dir,
                                    progress))
            task.advance()
    return outputs


def _run_one(probe, parsed, count: int, target: ProbeTarget, images: torch.Tensor, labels: torch.Tensor,
             run: ProbeRun, data_name: str, out_dir: Path, progress: Progress = SILENT) -> ProbeOutput:
    """One probe's table, figures and meta.json entry."""
    started = time.perf_counter()
    result = probe.run(target, images[:count], labels[:count], parsed, settings=run.settings, progress=progress)
    csv_path = write_table(result.table, out_dir / f"{probe.name}.csv")
    figures = probe.plot([result.table], out_dir)
    model_figures = []
    if result.level_drawings:  # a denoiser's figures: one folder per noise level
        for timestep, drawing in result.level_drawings.items():
            model_figures += probe.figures(target, drawing, out_dir / f"t{timestep}")  # made when written
    elif result.applies:
        model_figures = probe.figures(target, result.drawing, out_dir)
    seconds = time.perf_counter() - started
    record_meta(out_dir, probe.name, target, data_name, run, min(count, len(images)), seconds,
                [str(p.relative_to(out_dir)) for p in model_figures], list(result.level_drawings) or None)
    return ProbeOutput(probe.name, result.table, csv_path, figures + model_figures, seconds)


# Over training's Python call is here, not in over_training.py: it is run_probes with
# over_training set, and run_probes itself hands such a request down to over_training.py.
def probe_over_training(name: str, run: str | Path, **settings: Any) -> pd.DataFrame:
    """The long table of probe `name` ('all' for every probe) over every snapshot of `run`;
    `settings` are the probe settings as keywords (n_images, seed, batch_size, device and the
    probes' options). Writes the tables under `<run>/probes/over-training/` as the CLI does."""
    common = {k: settings.pop(k) for k in list(settings) if k in ProbeSettings.model_fields and k != "over_training"}
    outputs = run_probes([name], ProbeRequest(str(run), over_training=True, options=settings, **common))
    return pd.concat([o.table for o in outputs], ignore_index=True)

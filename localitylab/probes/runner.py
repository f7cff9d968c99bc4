"""Run probes on one model and write their outputs.

For each probe: `<out>/<probe>.csv` (and `.parquet` where pyarrow is installed), its
figures beside it, and an entry in `<out>/meta.json` recording the model spec, data, seed,
versions, the command and the code's git commit. `<out>` is `<run folder>/probes/` for a
checkpoint, or the request's `out`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from localitylab.data.registry import DataOptions
from localitylab.errors import UserError
from localitylab.io import atomic_path, check_folder, code_version, make_folder, write_json
from localitylab.probes.registry import get_probe, probe_names
from localitylab.probes.base import ProbeRun, parse_probe_settings
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


@dataclass
class ProbeOutput:
    probe: str
    table: pd.DataFrame
    csv: Path
    figures: list[Path]
    seconds: float
    probed: int = 1  # over training: the snapshots probed by this call (the others were read back)


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
        from localitylab.probes.over_training import run_over_training

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


def write_table(table: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return path
    with atomic_path(path.with_suffix(".parquet")) as tmp:
        table.to_parquet(tmp, index=False)
    return path


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a probe table back with the schema's types. Tables written before intervals
    existed (no ci_low / ci_high) read with those cells empty."""
    from localitylab.probes.base import COLUMNS, typed_frame

    path = Path(path)
    if not path.is_file():
        raise UserError(f"table not found: {path}")
    try:
        table = pd.read_csv(path, dtype={"model": str, "probe": str, "metric": str, "setting": str, "note": str},
                            keep_default_na=False, na_values={column: [""] for column in NUMERIC_COLUMNS})
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise UserError(f"{path} is not a probe table: {err}") from None
    for column in ("ci_low", "ci_high"):
        if column not in table.columns:
            table[column] = float("nan")
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise UserError(f"{path} is not a probe table: no column {missing[0]!r}")
    for column in NUMERIC_COLUMNS:
        table[column] = pd.to_numeric(table[column], errors="coerce")
    return typed_frame(table[[*COLUMNS, *(c for c in table.columns if c not in COLUMNS)]])


NUMERIC_COLUMNS = ("value", "ci_low", "ci_high", "layer", "head", "n_images")


def record_meta(out_dir: Path, probe: str, target: ProbeTarget, data_name: str, run: ProbeRun,
                n_images: int, seconds: float, artifacts: list[str] | None = None,
                timesteps: list[int] | None = None) -> Path:
    from localitylab.train.checkpoint import versions

    path = out_dir / "meta.json"
    meta: dict[str, Any] = {}
    if path.is_file():
        try:
            meta = json.loads(path.read_text())
        except json.JSONDecodeError:
            meta = {}
    meta.update({
        "model": target.display_name,
        "model_spec": target.spec.to_dict(),
        "source": target.source,
        "model_info": {"params": target.info.params, "patch_size": target.info.patch_size,
                       "tokens_per_image": target.info.tokens_per_image, "pos_embed": target.info.pos_embed},
        "checkpoint": {k: v for k, v in target.checkpoint.items() if k != "versions"},
        "preprocessing": preprocessing_record(target),
        "weights": target.weights or None,
    })
    probes = meta.setdefault("probes", {})
    probes[probe] = {
        "data": data_name, "split": "test", "n_images": n_images, "images_requested": run.settings.n_images,
        "seed": run.settings.seed,
        "timesteps": timesteps,  # the noise levels a denoiser was measured at; None otherwise
        "batch_size": run.settings.batch_size, "options": run.given, "device": str(target.device),
        "seconds": round(seconds, 3), "command": " ".join(["localitylab", *sys.argv[1:]]) if _from_cli() else None,
        "versions": versions(), **code_version(),
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "permute_seed": target.data.permute_seed, "permute_setting": target.data.permute_setting,
        "torch_threads": torch.get_num_threads(),
        "artifacts": artifacts or [],  # per-model figures (they need the model, so reports cannot redraw them)
    }
    return write_json(path, meta)


def preprocessing_record(target: ProbeTarget) -> dict[str, Any]:
    """How the probe's images were made into the model's input, for meta.json."""
    if target.preprocessing is not None:
        record = target.preprocessing.to_dict()
        if target.data.name.startswith("folder:"):
            record["decoding"] = (f"files decoded by the data set at {target.preprocessing.scale_size} px (shorter "
                                  "side, bilinear with antialiasing, centre square), then the model's transform")
        return record
    return {"source": f"data set {target.data.name}" + (" (as in training)" if target.checkpoint else ""),
            "input_size": [target.data.in_chans, target.data.img_size, target.data.img_size],
            "mean": list(target.data.mean), "std": list(target.data.std), "permute_seed": target.data.permute_seed,
            "permute_setting": target.data.permute_setting}


def _from_cli() -> bool:
    return Path(sys.argv[0]).name in ("localitylab", "main.py") or sys.argv[0].endswith("cli/main.py")

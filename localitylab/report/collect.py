"""Read what a report shows from disk: run.json, metrics.csv, probes/*.csv and meta.json.

Reports never load or run a model: everything comes from the files that training and the
probes wrote, so rebuilding a report is quick and it always matches its tables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from localitylab.errors import UserError


@dataclass
class RunRecord:
    path: Path
    name: str  # the display name probes use: 'pit-n (pit-n-digits)'
    spec: dict[str, Any]
    data: str
    config: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)  # last metrics row
    history: pd.DataFrame | None = None
    model_info: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    git_commit: str | None = None
    permute_seed: int | None = None
    command: str = ""
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    probe_meta: dict[str, Any] = field(default_factory=dict)  # meta.json["probes"]
    artifacts: dict[str, list[Path]] = field(default_factory=dict)  # per-model figures by probe
    # A diffusion run's samples (<run>/samples/): the sample-quality table, the grid, and how they were drawn.
    sample_quality: pd.DataFrame | None = None
    sample_grid: Path | None = None
    sample_meta: dict[str, Any] = field(default_factory=dict)
    # probe NAME RUN --over-training: long tables (with step, epoch) by probe; the run's snapshots (run.json)
    over_training: dict[str, pd.DataFrame] = field(default_factory=dict)
    snapshots: list[dict[str, Any]] = field(default_factory=list)

    @property
    def trained(self) -> bool:
        return bool(self.config)

    @property
    def accuracy(self) -> float | None:
        value = self.final.get("test_acc")
        return float(value) if value is not None else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not readable JSON: {err}") from None


def collect_run(path: str | Path) -> RunRecord:
    """A run folder (with run.json) or a probe output folder (with meta.json)."""
    from localitylab.probes.output import read_table

    path = Path(path).expanduser()
    if path.is_file() and path.name == "ckpt.pt":
        path = path.parent
    run_json, probe_dir = path / "run.json", path / "probes"
    if not run_json.is_file():
        if (path / "meta.json").is_file():
            probe_dir = path
        else:
            raise UserError(f"{path} is not a run folder (no run.json) nor a probe folder (no meta.json)")
    meta = _read_json(probe_dir / "meta.json") if (probe_dir / "meta.json").is_file() else {}
    if run_json.is_file():
        run = _read_json(run_json)
        spec = run.get("model_spec", {})
        record = RunRecord(
            path=path, name=f"{spec.get('name', '?')} ({path.name})", spec=spec, data=run.get("data", "?"),
            config=run.get("config", {}), final=run.get("metrics", {}), model_info=run.get("model_info", {}),
            versions=run.get("versions", {}), git_commit=run.get("git_commit"), permute_seed=run.get("permute_seed"),
            command=run.get("command", ""), snapshots=run.get("snapshots") or [],
        )
        metrics_csv = path / "metrics.csv"
        if metrics_csv.is_file():
            record.history = pd.read_csv(metrics_csv)
    else:
        record = RunRecord(path=path, name=meta.get("model", path.name), spec=meta.get("model_spec", {}),
                           data=next(iter(meta.get("probes", {}).values()), {}).get("data", "?"),
                           model_info=meta.get("model_info", {}))
    record.probe_meta = meta.get("probes", {})
    if probe_dir.is_dir():
        for csv_path in sorted(probe_dir.glob("*.csv")):
            table = read_table(csv_path)
            record.tables[csv_path.stem] = table
        for probe, entry in record.probe_meta.items():
            record.artifacts[probe] = [probe_dir / name for name in entry.get("artifacts", []) if (probe_dir / name).is_file()]
        for csv_path in sorted((probe_dir / "over-training").glob("*.csv")):
            record.over_training[csv_path.stem] = read_table(csv_path)
    _collect_samples(record, path / "samples")
    return record


def _collect_samples(record: RunRecord, folder: Path) -> None:
    """What `localitylab sample` and `evaluate-samples` wrote into a run's samples folder."""
    from localitylab.probes.output import read_table

    if (folder / "samples.png").is_file():
        record.sample_grid = folder / "samples.png"
    if (folder / "sample-quality.csv").is_file():
        record.sample_quality = read_table(folder / "sample-quality.csv")
    if (folder / "sample-quality.json").is_file():
        record.sample_meta = _read_json(folder / "sample-quality.json")


def collect_runs(paths: list[str | Path]) -> list[RunRecord]:
    if not paths:
        raise UserError("a report needs at least one run folder")
    records = [collect_run(p) for p in paths]
    seen: dict[str, Path] = {}
    for record in records:
        if record.name in seen:
            raise UserError(f"{record.path} and {seen[record.name]} have the same name {record.name!r}")
        seen[record.name] = record.path
    return records

"""What a probe run writes, for the runner and for the probes over training alike: each
probe's table (`<probe>.csv`, and `.parquet` where pyarrow is installed) and how it reads
back, its entry in `meta.json`, and the `ProbeOutput` that says where they went.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from localitylab.errors import UserError
from localitylab.io import atomic_path, code_version, write_json
from localitylab.probes.base import ProbeRun
from localitylab.probes.measurements import COLUMNS, typed_frame
from localitylab.probes.target import ProbeTarget


@dataclass
class ProbeOutput:
    probe: str
    table: pd.DataFrame
    csv: Path
    figures: list[Path]
    seconds: float
    probed: int = 1  # over training: the snapshots probed by this call (the others were read back)


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

"""A training job as data, for the ranks of a multi-process run: the configuration in a JSON
file, `{"config": {...TrainConfig...}, "quiet": bool}`, that every rank reads. Nothing is
turned into a command line and parsed again.

`write_job` writes it; each rank calls `run_job` on it (the CLI's `cli.worker`, which
torchrun starts once per rank, does: `localitylab train --nproc N`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from localitylab.errors import UserError
from localitylab.io import write_json
from localitylab.train.config import TrainConfig


def write_job(config: TrainConfig, quiet: bool, folder: Path | None = None) -> Path:
    """The job file for `config`, in the system's temporary folder (not the run folder:
    a job that fails before training leaves that untouched), or in `folder` (one that every
    node of a multi-node job sees)."""
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".localitylab-train-", suffix=".json", dir=folder)
    os.close(fd)
    write_json(Path(name), {"config": config.to_dict(), "quiet": quiet})
    return Path(name)


def read_job(path: str | Path) -> tuple[TrainConfig, bool]:
    try:
        job = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the training job {path}: {err}") from None
    if not isinstance(job, dict) or not isinstance(job.get("config"), dict):
        raise UserError(f"{path} is not a training job: no 'config' table")
    return TrainConfig(**job["config"]), bool(job.get("quiet", False))


def run_job(path: str | Path):
    """Train this rank's part of the job in `path`; returns (config, TrainResult)."""
    from localitylab.train.loop import train
    from localitylab.train.progress import make_reporter

    config, quiet = read_job(path)
    return config, train(config, make_reporter(quiet))

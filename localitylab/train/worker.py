"""One rank of a training job that torchrun started:

    torchrun --standalone --nproc-per-node N -m localitylab.train.worker JOB.json

JOB.json holds the configuration as data, `{"config": {...TrainConfig...}, "quiet": bool}`;
`write_job` writes it (`localitylab train --nproc N` does, then starts torchrun). Every rank
reads the same file: nothing is turned into a command line and parsed again.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from localitylab.errors import RunStopped, UserError
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


def run_job(path: str | Path) -> None:
    from localitylab.train.distributed import print_main
    from localitylab.train.loop import train
    from localitylab.train.progress import final_message, make_reporter

    config, quiet = read_job(path)
    final = train(config, make_reporter(quiet)).final
    if final:
        print_main(final_message(config.run_dir() / "ckpt.pt", final, config.task))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m localitylab.train.worker JOB.json", file=sys.stderr)
        return 2
    # The same one-line messages and exit statuses as the localitylab command.
    try:
        run_job(argv[0])
    except RunStopped as stopped:
        print(f"localitylab: {' '.join(str(stopped).split())}", file=sys.stderr)
        return stopped.exit_code
    except UserError as err:
        print(f"localitylab: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

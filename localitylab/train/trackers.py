"""Experiment trackers (`log`: tensorboard or wandb): the figures `metrics.csv` holds, per epoch,
and the training loss and learning rate at the steps the progress bar reports, for watching a
long run. Off by default; TensorBoard writes event files into the run folder and needs no
network; Weights & Biases is used only when the `wandb` package is installed.

Names: `epoch/<column>` for each metrics.csv column (x: the epoch), `step/train_loss` and
`step/lr` (x: the optimiser step). Only the process that writes the run folder logs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from localitylab.errors import UserError

TENSORBOARD_FOLDER = "tensorboard"


class Tracker:
    """Receives the run's figures; the base class ignores them (no `log`)."""

    def step(self, step: int, values: dict[str, float]) -> None: ...

    def epoch(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def epoch_scalars(row: dict[str, Any]) -> dict[str, float]:
    """A metrics.csv row as `epoch/<column>` scalars (the columns with a value)."""
    from localitylab.train.checkpoint import METRIC_COLUMNS

    return {f"epoch/{key}": float(row[key]) for key in METRIC_COLUMNS
            if key != "epoch" and row.get(key) is not None}


class TensorBoardTracker(Tracker):
    def __init__(self, run_dir: Path, recipe_text: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_FOLDER))
        self.writer.add_text("recipe", recipe_text)

    def step(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"step/{key}", value, step)

    def epoch(self, row: dict[str, Any]) -> None:
        for key, value in epoch_scalars(row).items():
            self.writer.add_scalar(key, value, int(row["epoch"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        # The run folder names the run; resuming it continues the same wandb run.
        self.wandb = wandb
        self.run = wandb.init(project="localitylab", name=run_dir.name, dir=str(run_dir), config=config,
                              id=_wandb_id(run_dir), resume="allow")
        self.run.define_metric("epoch/*", step_metric="epoch")

    def step(self, step: int, values: dict[str, float]) -> None:
        self.run.log({f"step/{key}": value for key, value in values.items()}, step=step)

    def epoch(self, row: dict[str, Any]) -> None:
        self.run.log({**epoch_scalars(row), "epoch": int(row["epoch"])}, step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


def _wandb_id(run_dir: Path) -> str:
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]


def check_tracker(log: str | None) -> None:
    """Fail before any work if the tracker's package is missing: one line saying what to install."""
    if log is None:
        return
    module, package = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}[log]
    try:
        __import__(module)
    except ImportError:
        raise UserError(f"log {log} needs the {package} package (pip install {package}); it is not installed here",
                        setting="log") from None


def make_tracker(log: str | None, run_dir: Path, config: dict[str, Any], recipe_text: str) -> Tracker:
    if log == "tensorboard":
        return TensorBoardTracker(run_dir, recipe_text)
    if log == "wandb":
        return WandbTracker(run_dir, config)
    return Tracker()

"""Progress reporting for training: silent by default, a rich progress bar for the CLI."""

from __future__ import annotations

import sys
from typing import Any


class Reporter:
    """Receives training events; the base class ignores them all."""

    def start(self, epochs: int, steps_per_epoch: int, first_epoch: int) -> None: ...

    def step(self, epoch: int, step: int, loss: float | None) -> None: ...

    def epoch_end(self, row: dict[str, Any]) -> None: ...

    def message(self, text: str) -> None: ...

    def close(self) -> None: ...


class RichReporter(Reporter):
    """One bar over all steps of the run, with loss, accuracy and images/s."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=self.console, transient=False,
        )
        self.task = None
        self.last: dict[str, Any] = {}

    def start(self, epochs: int, steps_per_epoch: int, first_epoch: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=epochs * steps_per_epoch, completed=(first_epoch - 1) * steps_per_epoch,
            epoch=f"{first_epoch}/{epochs}", status="",
        )
        self.epochs = epochs

    def step(self, epoch: int, step: int, loss: float | None) -> None:
        status = self._status(loss)
        self.progress.update(self.task, advance=1, epoch=f"{epoch}/{self.epochs}", status=status)

    def epoch_end(self, row: dict[str, Any]) -> None:
        self.last = row
        self.progress.update(self.task, status=self._status(None))

    def _status(self, loss: float | None) -> str:
        parts = []
        if loss is not None:
            parts.append(f"loss {loss:.3f}")
        if self.last:
            parts += [test_measure(self.last, 3), f"{self.last['images_per_s']:.0f} img/s"]
        return "  ".join(parts)

    def message(self, text: str) -> None:
        self.console.print(text)

    def close(self) -> None:
        self.progress.stop()


class PlainReporter(Reporter):
    """One line per epoch, for logs and non-terminals."""

    def message(self, text: str) -> None:
        print(text, file=sys.stderr)

    def epoch_end(self, row: dict[str, Any]) -> None:
        print(
            f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}  {test_measure(row, 4)}  "
            f"{row['images_per_s']:.0f} img/s",
            file=sys.stderr,
        )


def test_measure(row: dict[str, Any], digits: int) -> str:
    """Test accuracy for a classifier; test loss for a task without one (MAE)."""
    if row.get("test_acc") is None:
        return f"test loss {row['test_loss']:.{digits}f}"
    return f"test acc {row['test_acc']:.{digits}f}"


def make_reporter(quiet: bool) -> Reporter:
    """A progress bar on a terminal; one line per epoch when quiet or in a log."""
    return PlainReporter() if quiet or not sys.stderr.isatty() else RichReporter()


LOSS_NAMES = {"mae": "reconstruction", "diffusion": "denoising"}


def final_message(checkpoint: Any, final: dict[str, Any], task: str = "mae") -> str:
    """The line a finished run prints: where its checkpoint is and how good it is."""
    if final.get("test_acc") is not None:
        measure = f"test accuracy {final['test_acc']:.4f}"
    else:
        measure = f"test {LOSS_NAMES.get(task, task)} loss {final['test_loss']:.4f}"
    return f"{checkpoint}: {measure} after {final['epoch']} epoch{'' if final['epoch'] == 1 else 's'}"

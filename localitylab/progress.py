"""Progress of the long steps (probes over their batches, `probe all`, ...), as an object the
caller passes down: the library reports to it and never prints. `Progress` (the default)
ignores everything; `RichProgress` draws rich bars on stderr (a terminal or a notebook) and
is chosen by the CLI (unless `--quiet`) and by `localitylab.probe` (unless `progress=False`).
Setting LOCALITYLAB_FORCE_TERMINAL=1 draws the bars even where stderr is no terminal."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator


class Task:
    """One step being counted; `advance` after each unit of work."""

    def advance(self, amount: int = 1) -> None: ...


class Progress:
    """Receives progress; this base class ignores it (the library's default: silent)."""

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Task]:
        yield Task()


SILENT = Progress()


class _RichTask(Task):
    def __init__(self, bars, task_id) -> None:
        self.bars, self.task_id = bars, task_id

    def advance(self, amount: int = 1) -> None:
        self.bars.update(self.task_id, advance=amount)


class RichProgress(Progress):
    """rich progress bars on stderr, one per step (nested steps share one live display)."""

    def __init__(self, force_terminal: bool | None = None) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bars, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn)

        if force_terminal is None and os.environ.get("LOCALITYLAB_FORCE_TERMINAL") == "1":
            force_terminal = True
        self.console = Console(stderr=True, force_terminal=force_terminal)
        self.bars = Bars(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                         TimeElapsedColumn(), console=self.console, transient=False)
        self.open = 0

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Task]:
        if self.open == 0:
            self.bars.start()
        self.open += 1
        task_id = self.bars.add_task(description, total=total)
        try:
            yield _RichTask(self.bars, task_id)
        finally:
            if total is None:
                done = self.bars.tasks[[t.id for t in self.bars.tasks].index(task_id)].completed
                self.bars.update(task_id, total=done)
            self.open -= 1
            if self.open == 0:
                self.bars.stop()


def make_progress(show: bool = True) -> Progress:
    """Bars where someone watches (a terminal, a notebook, or LOCALITYLAB_FORCE_TERMINAL=1);
    silent when `show` is False or stderr is a log."""
    if not show:
        return SILENT
    forced = os.environ.get("LOCALITYLAB_FORCE_TERMINAL") == "1"
    if forced or sys.stderr.isatty() or _in_notebook():
        return RichProgress()
    return SILENT


def _in_notebook() -> bool:
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"

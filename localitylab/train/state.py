"""Where a training run stands, and everything resuming it needs: one object.

`TrainState` holds the position (epochs finished, batches of the next epoch finished,
optimiser steps), the finished epochs' metrics, and the running sums of the epoch in
progress. The checkpoint stores `state_dict()`; `load_state_dict()` restores it, and also
reads the shape checkpoints had before format 2 (a 'partial' dict for a mid-epoch stop).

Under DDP the running sums are this process's share. `state_dict` adds them over ranks
(every rank must call it); `load_state_dict` gives the saved totals to rank 0 and zero to
the others, so that adding over ranks again at the end of the epoch counts them once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from localitylab.errors import UserError
from localitylab.train.distributed import Distributed

ONE_PROCESS = Distributed()


@dataclass
class TrainState:
    device: torch.device = torch.device("cpu")
    epoch: int = 0  # epochs finished
    batch: int = 0  # batches of epoch + 1 finished: 0 except after a mid-epoch stop
    step: int = 0  # optimiser steps taken
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per finished epoch
    # The epoch in progress: this process's loss sum, correct predictions and images, and the
    # seconds it took before this process took it up (a resumed run's earlier part).
    loss_sum: torch.Tensor = field(init=False)
    correct: torch.Tensor = field(init=False)
    seen: int = 0
    elapsed_before: float = 0.0
    # The first step whose loss was not finite (-1: none), kept on the device: read only where
    # the loop synchronises anyway, so that no step waits for the host.
    first_bad_step: torch.Tensor = field(init=False)
    started: float = field(default=0.0, repr=False)  # perf_counter() when this process took the epoch up

    def __post_init__(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device, dtype=torch.long)
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=self.device)

    # --- during an epoch ---------------------------------------------------------------------------
    def start_epoch(self) -> None:
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, correct: torch.Tensor | None, images: int) -> None:
        """Count one step's batch: on the device, with no host synchronisation."""
        loss = loss.detach()
        self.first_bad_step = torch.where((self.first_bad_step < 0) & ~torch.isfinite(loss), self.step,
                                          self.first_bad_step)
        self.loss_sum += loss * images
        if correct is not None:
            self.correct += correct
        self.seen += images
        self.batch += 1

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def check_finite(self, ranks: Distributed, steps_per_epoch: int, checkpoint: Any) -> None:
        """Raise if any rank saw a loss that was not finite, naming its step and epoch."""
        bad = int(ranks.sum(self.first_bad_step.clamp(min=0)).item()) if ranks.enabled else int(self.first_bad_step)
        if bad > 0:
            raise UserError(
                f"training diverged: the loss was not finite at step {bad} (epoch {(bad - 1) // steps_per_epoch + 1}); "
                f"the last good checkpoint ({checkpoint}) is kept. Try a lower lr.", setting="lr"
            )

    def totals(self, ranks: Distributed) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The epoch's loss sum, correct count and images so far, over all ranks."""
        return ranks.sum(self.loss_sum.clone()), ranks.sum(self.correct.clone()), self.seen * ranks.world_size

    def finish_epoch(self, ranks: Distributed, reports_accuracy: bool) -> dict[str, Any]:
        """The finished epoch's training figures, over all ranks (its time excludes the
        evaluation that follows); the next epoch starts from zero."""
        elapsed = self.elapsed()
        loss_sum, correct, seen = self.totals(ranks)
        self.epoch, self.batch, self.seen, self.elapsed_before = self.epoch + 1, 0, 0, 0.0
        self.loss_sum, self.correct = torch.zeros_like(self.loss_sum), torch.zeros_like(self.correct)
        return {"epoch": self.epoch, "step": self.step, "train_loss": float(loss_sum) / max(1, seen),
                "train_acc": int(correct) / max(1, seen) if reports_accuracy else None,
                "epoch_time_s": elapsed, "images_per_s": seen / max(elapsed, 1e-9)}

    # --- saving and resuming ---------------------------------------------------------------------
    def where(self) -> str:
        return f"epoch {self.epoch + 1}" + (f", batch {self.batch + 1}" if self.batch else "")

    def state_dict(self, ranks: Distributed = ONE_PROCESS) -> dict[str, Any]:
        """Plain values and CPU tensors; every rank must call it (the sums are added over ranks)."""
        progress = None
        if self.batch:
            loss_sum, correct, seen = self.totals(ranks)
            progress = {"batch": self.batch, "loss_sum": loss_sum.cpu(), "correct": correct.cpu(), "seen": seen,
                        "elapsed_s": self.elapsed()}
        return {"epoch": self.epoch, "step": self.step, "history": list(self.history),
                "metrics": self.history[-1] if self.history else {}, "epoch_progress": progress}

    def load_state_dict(self, data: dict[str, Any], ranks: Distributed = ONE_PROCESS) -> None:
        self.epoch, self.step = int(data["epoch"]), int(data["step"])
        self.history = list(data.get("history", []))
        progress = data.get("epoch_progress")
        old = data.get("partial")  # format 1: the epoch in progress named itself, one past `epoch`
        if progress is None and old:
            if int(old["epoch"]) != self.epoch + 1:
                raise UserError(f"a mid-epoch checkpoint of epoch {old['epoch']} after {self.epoch} epochs cannot resume")
            progress = {key: old[key] for key in ("batch", "loss_sum", "correct", "seen", "elapsed_s")}
        if not progress:
            return
        self.batch, self.elapsed_before = int(progress["batch"]), float(progress["elapsed_s"])
        if ranks.is_main:
            self.loss_sum = progress["loss_sum"].to(self.device)
            self.correct = progress["correct"].to(self.device)
        self.seen = int(progress["seen"]) // ranks.world_size  # every rank saw its equal share

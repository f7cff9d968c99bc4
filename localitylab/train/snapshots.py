"""Snapshots: the model's weights at chosen moments of a run, for asking how locality grew.

`snapshots` (TrainConfig, `--snapshots SPEC`, a study's `snapshots = ...`) says when:

- a count N (`8`): N moments log-spaced in optimizer steps (locality moves most early),
  always step 0 (the initialisation, written before the first step) and the last step;
- `every:K`: every K epochs, with step 0 and the end;
- a list of epochs (`0,1,2,5,10`; a TOML list too): exactly those epochs' ends (0: the
  initialisation).

The schedule is a function of the run's total steps (`snapshot_steps`), never of the
process: a resumed run writes the same moments an uninterrupted one would. It does not
define the run: a resumed run may keep more (or fewer) moments from there on.

Each moment is `<run>/snapshots/step-000123.safetensors`: the model's state dict as the
checkpoint holds it (an MAE run: the encoder), with its step, epoch (steps / steps per
epoch: fractional between epoch ends) and test figures as safetensors metadata, and a line
in `<run>/snapshots/index.json`; both are written atomically, by rank 0. run.json lists
them. `localitylab.load(run, step=...)` or `epoch=...` loads one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localitylab.errors import UserError

FOLDER, INDEX = "snapshots", "index.json"
SPEC_HELP = "a count of log-spaced moments (8), every:K epochs (every:5) or a list of epochs (0,1,2,5,10)"


@dataclass(frozen=True)
class SnapshotSpec:
    """A parsed `snapshots` setting: exactly one of count, every or epochs."""

    count: int | None = None
    every: int | None = None
    epochs: tuple[int, ...] = ()

    def __str__(self) -> str:
        if self.count is not None:
            return str(self.count)
        if self.every is not None:
            return f"every:{self.every}"
        return ",".join(map(str, self.epochs)) + ("," if len(self.epochs) == 1 else "")  # "5," is epoch 5, "5" a count


def _bad(value: Any, why: str) -> UserError:
    return UserError(f"snapshots must be {SPEC_HELP}; {why}, got {value!r}", setting="snapshots")


def _whole(text: Any, value: Any) -> int:
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise _bad(value, "not a whole number")
    try:
        return int(text.strip()) if isinstance(text, str) else text
    except ValueError:
        raise _bad(value, "not a whole number" if text == value else f"{text.strip()!r} is not a whole number") from None


def parse_snapshots(value: Any) -> SnapshotSpec | None:
    """The setting as typed (text), or as a study or Python gives it (an int, a list); None:
    no snapshots. Raises a UserError naming `snapshots`."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        epochs = [_whole(item, value) for item in value]
    elif isinstance(value, str) and value.strip().lower().startswith("every:"):
        every = _whole(value.strip()[len("every:"):], value)
        if every < 1:
            raise _bad(value, "every:K needs K >= 1")
        return SnapshotSpec(every=every)
    elif isinstance(value, str) and "," in value:
        epochs = [_whole(item, value) for item in value.split(",") if item.strip()]
    else:
        count = _whole(value, value)
        if count < 2:
            raise _bad(value, "a count is at least 2 (step 0 and the end)")
        return SnapshotSpec(count=count)
    if not epochs:
        raise _bad(value, "the list of epochs is empty")
    if min(epochs) < 0:
        raise _bad(value, "an epoch is >= 0")
    if len(set(epochs)) != len(epochs):
        raise _bad(value, "an epoch is listed twice")
    return SnapshotSpec(epochs=tuple(sorted(epochs)))


def log_spaced_steps(count: int, total: int) -> list[int]:
    """`count` distinct steps from 0 to `total`, both included, the rest log-spaced in
    between (all steps if there are fewer than `count`)."""
    if count >= total + 1:
        return list(range(total + 1))
    inner = count - 1  # moments after step 0: geometric from 1 to total
    raw = [round(math.exp(math.log(total) * i / (inner - 1))) if inner > 1 else total for i in range(inner)]
    steps: list[int] = []
    for step in raw:  # distinct: each at least one past the one before ...
        steps.append(max(step, steps[-1] + 1 if steps else 1))
    for i in range(inner - 1, -1, -1):  # ... and room left for the ones after, the last = total
        steps[i] = min(steps[i], total - (inner - 1 - i))
    return [0, *steps]


def snapshot_steps(spec: SnapshotSpec | None, steps_per_epoch: int, epochs: int) -> tuple[int, ...]:
    """The optimizer steps after which a run of `epochs` x `steps_per_epoch` keeps the model."""
    if spec is None:
        return ()
    total = epochs * steps_per_epoch
    if spec.count is not None:
        return tuple(log_spaced_steps(spec.count, total))
    if spec.every is not None:
        return tuple(sorted({*range(0, total + 1, spec.every * steps_per_epoch), total}))
    return tuple(epoch * steps_per_epoch for epoch in spec.epochs if epoch <= epochs)


# What a plan assumes a snapshot costs: one write of the weights (float32) at this speed, a
# modest disk's; the evaluation a moment between epoch ends adds is one test pass, left out.
WRITE_BYTES_PER_S = 200e6


def planned_snapshots(config: Any, train_images: int, parameters: int) -> tuple[int, float]:
    """(snapshots, seconds writing them) of a run planned with `config` (a TrainConfig)."""
    from localitylab.data.batching import batches_per_epoch

    steps = snapshot_steps(parse_snapshots(config.snapshots), batches_per_epoch(train_images, config.batch_size),
                           config.epochs)
    return len(steps), len(steps) * 4 * parameters / WRITE_BYTES_PER_S


def file_name(step: int) -> str:
    return f"step-{step:06d}.safetensors"


def read_index(run_dir: Path) -> list[dict[str, Any]]:
    """The run's snapshots, by step ([] if it keeps none)."""
    path = Path(run_dir) / FOLDER / INDEX
    if not path.is_file():
        return []
    return sorted(json.loads(path.read_text())["snapshots"], key=lambda entry: entry["step"])


class SnapshotWriter:
    """Writes a run's scheduled snapshots (rank 0; the other ranks only keep the schedule)."""

    def __init__(self, run_dir: Path, steps: tuple[int, ...], steps_per_epoch: int, spec: SnapshotSpec | None,
                 writes: bool) -> None:
        self.folder, self.steps, self.steps_per_epoch = Path(run_dir) / FOLDER, frozenset(steps), steps_per_epoch
        self.spec, self.writes = spec, writes
        self.entries = {entry["step"]: entry for entry in read_index(run_dir)} if writes else {}

    def due(self, step: int) -> bool:
        return step in self.steps

    def resume_at(self, step: int) -> None:
        """Forget (and delete) moments past the checkpoint: a killed run wrote them, and the
        resumed run writes again the ones its schedule has."""
        if not self.writes:
            return
        later = [s for s in self.entries if s > step]
        for moment in later:
            self.entries.pop(moment)
        if later:
            self._write_index()
        for path in self.folder.glob("step-*.safetensors"):  # listed or not (killed before the index was)
            if path.stem[len("step-"):].isdigit() and int(path.stem[len("step-"):]) > step:
                path.unlink(missing_ok=True)

    def write(self, state_dict: dict[str, Any], step: int, test: dict[str, Any]) -> None:
        """Keep the weights after `step`, with its epoch and test figures (test_loss, test_acc)."""
        if not self.writes:
            return
        from safetensors.torch import save_file

        from localitylab.io import atomic_path

        entry = {"step": step, "epoch": step / self.steps_per_epoch, "file": file_name(step),
                 "test_loss": test.get("test_loss"), "test_acc": test.get("test_acc")}
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {key: value.detach().cpu().clone().contiguous() for key, value in state_dict.items()}
        metadata = {"format": "localitylab.snapshot", **{k: json.dumps(v) for k, v in entry.items() if k != "file"}}
        try:
            with atomic_path(self.folder / entry["file"]) as tmp:
                save_file(tensors, str(tmp), metadata=metadata)
            self.entries[step] = entry
            self._write_index()
        except OSError as err:
            raise UserError(f"could not write the snapshot of step {step} in {self.folder} "
                            f"({err.strerror or err})") from None

    def _write_index(self) -> None:
        from localitylab.io import write_json

        write_json(self.folder / INDEX, {"format": "localitylab.snapshots", "schedule": str(self.spec or ""),
                                         "steps_per_epoch": self.steps_per_epoch, "snapshots": self.listed()})

    def listed(self) -> list[dict[str, Any]]:
        return [self.entries[step] for step in sorted(self.entries)]


def find_snapshot(run_dir: Path, step: int | None, epoch: float | None) -> dict[str, Any]:
    """The run's snapshot at exactly `step` (or `epoch`); an error lists the ones it has."""
    if step is not None and epoch is not None:
        raise UserError("give step or epoch, not both", settings=("step", "epoch"))
    entries = read_index(run_dir)
    found = [e for e in entries if (e["step"] == step if step is not None else math.isclose(e["epoch"], epoch))]
    if found:
        return found[0]
    asked = f"step {step}" if step is not None else f"epoch {epoch}"
    have = ", ".join(f"step {e['step']} (epoch {e['epoch']:g})" for e in entries) or "none (train it with snapshots)"
    raise UserError(f"{run_dir} has no snapshot at {asked}; it has: {have}", setting="step" if step is not None else "epoch")


def snapshot_weights(run_dir: Path, entry: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / FOLDER / entry["file"]))

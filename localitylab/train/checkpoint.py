"""Checkpoints: one file, loadable with `torch.load(weights_only=True)`, never code.

A checkpoint holds only tensors and plain Python values: the model state, the model spec
(enough to rebuild the architecture from the registry), the data description (shapes,
normalisation, class names, pixel permutation), the training config, the model's summary,
versions, the optimizer state and the TrainState (epoch, step, history, and the epoch in
progress after a mid-epoch stop) for `resume`.

`write_run` is the one save: ckpt.pt first, then metrics.csv and run.json, both derived from
what ckpt.pt holds.

Format 2 (this one) keeps the epoch in progress as `epoch_progress`; format 1 kept it as
`partial`. Both load; `TrainState.load_state_dict` reads either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import csv
import io

import torch
import torch.nn as nn

from localitylab.data.registry import DataInfo, DataOptions, takes_img_size
from localitylab.errors import UserError
from localitylab.io import atomic_path, safe_torch_load, write_json, write_text
from localitylab.models.registry import ModelSpec, build_model
from localitylab.train.config import TrainConfig
from localitylab.version import __version__

FORMAT = "localitylab.checkpoint"
FORMAT_VERSION = 2
METRIC_COLUMNS = ("epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_time_s", "images_per_s")


def versions() -> dict[str, str]:
    import timm

    # str(): torch.__version__ is a TorchVersion, which weights_only loading refuses.
    return {"localitylab": str(__version__), "torch": str(torch.__version__), "timm": str(timm.__version__)}


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions(), **payload}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def write_run(run_dir: Path, payload: dict[str, Any]) -> None:
    """The one save of a training run: ckpt.pt first, then metrics.csv and run.json derived
    from it. Each is written to a temporary name and renamed, so a failure (a full disk)
    leaves every previous file whole."""
    checkpoint = run_dir / "ckpt.pt"
    try:
        save_checkpoint(checkpoint, payload)
        write_metrics(run_dir / "metrics.csv", payload["history"])
        write_json(run_dir / "run.json", run_record(payload))
    except OSError as err:
        kept = f"the previous checkpoint {checkpoint} is intact" if checkpoint.exists() else "no checkpoint was written"
        raise UserError(f"could not write the run files in {run_dir} ({err.strerror or err}); {kept}") from None


def run_record(payload: dict[str, Any]) -> dict[str, Any]:
    """run.json: what reports and studies read about a run, without loading its weights."""
    return {
        "model_spec": payload["model_spec"], "data": payload["data"]["name"], "config": payload["config"],
        "metrics": payload["metrics"], "model_info": payload["model_info"], "task": payload["task"],
        "permute_seed": payload["data"]["permute_seed"],
        "permute_setting": payload["data"].get("permute_setting"), "epochs_done": payload["epoch"],
        "command": TrainConfig(**payload["config"]).command(), "init_from": payload["init_from"],
        "recipe": payload.get("recipe"), "snapshots": payload.get("snapshots", []),
        "versions": versions(), **payload["code_version"],
    }


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    write_text(path, buffer.getvalue())


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and validate a localitylab checkpoint (still as a dict)."""
    data = safe_torch_load(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path} is not a localitylab checkpoint (no '{FORMAT}' marker)")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer localitylab (format {data['format_version']}); upgrade to read it")
    for key in ("model_spec", "model_state", "data"):
        if key not in data:
            raise UserError(f"{path} is incomplete: no {key!r}")
    return data


@dataclass
class TrainedRun:
    """What a checkpoint says about the run that trained its model, besides the weights:
    `localitylab.load(...)` attaches it as `model.run`."""

    spec: ModelSpec
    data: DataInfo
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    epoch: int | float = 0  # epochs done; a snapshot between epoch ends: steps / steps per epoch
    path: Path | None = None
    step: int | None = None  # a snapshot's optimizer step (None: the run's last checkpoint)

    @property
    def run_name(self) -> str:
        return self.path.parent.name if self.path is not None else self.spec.name

    @property
    def display_name(self) -> str:
        """'pit-n (pit-n-digits)': the registry name plus the run folder."""
        return f"{self.spec.name} ({self.run_name})" if self.path is not None else self.spec.name

    def data_options(self, dataset: str, options: DataOptions) -> DataOptions:
        """How to read `dataset` for this model, as its run read it where `options` do not
        say otherwise: resized to the run's image size, its own data set from the hf:
        columns the run named, and data sets read from the run's data folder (its data_dir)
        while that folder exists and no other is given."""
        import dataclasses

        recorded = self.config.get("data_dir")
        if options.data_dir is None and recorded and Path(recorded).expanduser().is_dir():
            options = dataclasses.replace(options, data_dir=Path(recorded).expanduser())

        if options.img_size is None and takes_img_size(dataset):
            options = dataclasses.replace(options, img_size=self.data.img_size)
        if dataset == self.data.name:
            options = dataclasses.replace(options, image_column=options.image_column or self.config.get("image_column"),
                                          label_column=options.label_column or self.config.get("label_column"))
        return options


def model_from_checkpoint(data: dict[str, Any], path: Path | None = None) -> tuple[nn.Module, TrainedRun]:
    spec = ModelSpec.from_dict(data["model_spec"])
    model = build_model(spec)
    try:
        model.load_state_dict(data["model_state"])
    except RuntimeError as err:
        raise UserError(f"{path}: weights do not fit {spec.name}: {str(err).splitlines()[0]}") from None
    run = TrainedRun(
        spec=spec,
        data=DataInfo.from_dict(data["data"]),
        config=data.get("config", {}),
        metrics=data.get("metrics", {}),
        versions=data.get("versions", {}),
        epoch=int(data.get("epoch", 0)),
        path=Path(path) if path is not None else None,
    )
    return model, run


def load(path: str | Path, device: str | torch.device = "cpu", *, step: int | None = None,
         epoch: float | None = None) -> nn.Module:
    """Load a checkpoint (its file, or the run folder) as a ready model in eval mode;
    `model.run` is its TrainedRun.

    step= / epoch=: the run's snapshot at exactly that optimizer step or epoch (a run trained
    with `snapshots`) instead of its last checkpoint; `model.run` is the run's, with the
    snapshot's `step`, `epoch` and test figures (`metrics`). No snapshot there: a UserError
    listing the ones the run has (no nearest one is chosen for you).

    >>> model = localitylab.load("runs/pit-n-digits/ckpt.pt")
    >>> logits = model(model.run.data.prepare(uint8_images))
    >>> untrained = localitylab.load("runs/pit-n-digits", step=0)
    """
    path = Path(path)
    if path.is_dir():
        path = path / "ckpt.pt"
    data = read_checkpoint(path)
    if step is not None or epoch is not None:
        from localitylab.train.snapshots import find_snapshot, snapshot_weights

        snapshot = find_snapshot(path.parent, step, epoch)
        data = {**data, "model_state": snapshot_weights(path.parent, snapshot), "epoch": snapshot["epoch"],
                "metrics": {key: snapshot[key] for key in ("step", "epoch", "test_loss", "test_acc")}}
    model, run = model_from_checkpoint(data, path)
    if step is not None or epoch is not None:
        run.step, run.epoch = snapshot["step"], snapshot["epoch"]
    model.run = run
    # timm reads normalisation from pretrained_cfg (timm.data.resolve_data_config).
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    cfg.update(mean=tuple(run.data.mean), std=tuple(run.data.std),
               input_size=(run.data.in_chans, run.data.img_size, run.data.img_size))
    model.pretrained_cfg = cfg
    return model.to(device).eval()

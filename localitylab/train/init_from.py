"""Start a run from another run's weights (`init_from`) and train only the head on frozen
features (`linear_probe`).

Any localitylab checkpoint works as a source: an MAE pre-training run (its encoder) or a
supervised run. Weights are matched by name; a matching name with another shape is an
error (an image size or width that differs), except for the classifier head, which is
expected to differ between data sets and starts fresh.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from localitylab.errors import UserError
from localitylab.train.checkpoint import read_checkpoint

# The classifier of timm ViTs ("head") and ResNets ("fc"): replaced, never transferred.
HEAD_PREFIXES = ("head.", "fc.")


@dataclass
class InitReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)  # in this model, not taken from the source
    ignored: list[str] = field(default_factory=list)  # in the source, not in this model (an MAE decoder...)

    def summary(self) -> str:
        return (f"initialised from {self.source}: {len(self.loaded)} tensors loaded, {len(self.new)} new "
                f"({', '.join(self.new) or 'none'}), {len(self.ignored)} of the source's not used")

    def to_dict(self) -> dict:
        return {"source": self.source, "loaded": len(self.loaded), "new": self.new, "ignored": len(self.ignored)}


def is_head(key: str) -> bool:
    return key.startswith(HEAD_PREFIXES)


def init_from_checkpoint(model: nn.Module, path: str | Path) -> InitReport:
    """Copy every tensor of `path`'s model whose name and shape match into `model`."""
    source = read_checkpoint(path)
    saved = source["model_state"]
    target = model.state_dict()
    report = InitReport(str(path))
    mismatched = []
    for key, value in target.items():
        if key not in saved:
            report.new.append(key)
        elif tuple(saved[key].shape) == tuple(value.shape):
            report.loaded.append(key)
        elif is_head(key):
            report.new.append(key)
        else:
            mismatched.append(f"{key} is {tuple(saved[key].shape)} there, {tuple(value.shape)} here")
    if mismatched:
        spec = source["model_spec"]
        raise UserError(
            f"cannot initialise from {path} (a {spec.get('name')} at {spec.get('img_size')}px): "
            f"{len(mismatched)} tensors differ in shape, e.g. {mismatched[0]}; use the same model and image size"
        )
    if not report.loaded:
        raise UserError(f"cannot initialise from {path}: no tensor of it matches this model by name")
    report.ignored = sorted(set(saved) - set(target))
    with torch.no_grad():
        for key in report.loaded:
            target[key].copy_(saved[key])
    return report


def freeze_all_but_head(model: nn.Module) -> list[str]:
    """Linear probing: only the classifier trains; returns the names left trainable."""
    trainable = []
    for name, param in model.named_parameters():
        keep = is_head(name)
        param.requires_grad_(keep)
        if keep:
            trainable.append(name)
    if not trainable:
        raise UserError("linear_probe: this model has no classifier head (head.* or fc.*) to train",
                        setting="linear_probe")
    return trainable

"""Checkpoints: one file, loadable with `torch.load(weights_only=True)`, never code.

A checkpoint holds only tensors and plain Python values: the model state, the model spec
(enough to rebuild the architecture from the registry), the data description (shapes,
normalisation, class names, pixel permutation), the training config, metrics, versions,
and the optimizer state for `--resume`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from localitylab.data.registry import DataInfo
from localitylab.errors import UserError
from localitylab.io import atomic_path, safe_torch_load
from localitylab.models.registry import ModelSpec, build_model

FORMAT = "localitylab.checkpoint"
FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    import timm

    from localitylab import __version__

    # str(): torch.__version__ is a TorchVersion, which weights_only loading refuses.
    return {"localitylab": str(__version__), "torch": str(torch.__version__), "timm": str(timm.__version__)}


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions(), **payload}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


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
class RunInfo:
    """Everything a checkpoint says about its model besides the weights."""

    spec: ModelSpec
    data: DataInfo
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    epoch: int = 0
    path: Path | None = None

    @property
    def run_name(self) -> str:
        return self.path.parent.name if self.path is not None else self.spec.name

    @property
    def display_name(self) -> str:
        """'pit-n (pit-n-digits)': the registry name plus the run folder."""
        return f"{self.spec.name} ({self.run_name})" if self.path is not None else self.spec.name


def model_from_checkpoint(data: dict[str, Any], path: Path | None = None) -> tuple[nn.Module, RunInfo]:
    spec = ModelSpec.from_dict(data["model_spec"])
    model = build_model(spec)
    try:
        model.load_state_dict(data["model_state"])
    except RuntimeError as err:
        raise UserError(f"{path}: weights do not fit {spec.name}: {str(err).splitlines()[0]}") from None
    info = RunInfo(
        spec=spec,
        data=DataInfo.from_dict(data["data"]),
        config=data.get("config", {}),
        metrics=data.get("metrics", {}),
        versions=data.get("versions", {}),
        epoch=int(data.get("epoch", 0)),
        path=Path(path) if path is not None else None,
    )
    return model, info


def load(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load a checkpoint as a ready model in eval mode; `model.run` is its RunInfo.

    >>> model = localitylab.load("runs/pit-n-digits/ckpt.pt")
    >>> logits = model(model.run.data.prepare(uint8_images))
    """
    data = read_checkpoint(path)
    model, info = model_from_checkpoint(data, Path(path))
    model.run = info
    # timm reads normalisation from pretrained_cfg (timm.data.resolve_data_config).
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    cfg.update(mean=tuple(info.data.mean), std=tuple(info.data.std),
               input_size=(info.data.in_chans, info.data.img_size, info.data.img_size))
    model.pretrained_cfg = cfg
    return model.to(device).eval()

"""Any timm model as a localitylab model: `timm:NAME` with `--model-kw` and `--weights`.

Image size, channels and classes come from the data set unless `--model-kw` sets them.
Weights are read from local files only (safetensors or a plain state dict loaded with
`weights_only=True`): nothing is fetched and nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from localitylab.errors import UserError
from localitylab.models.registry import ModelSpec


def build_timm_model(spec: ModelSpec) -> nn.Module:
    import timm

    name = spec.name[len("timm:"):]
    if not timm.is_model(name):
        close = timm.list_models(f"*{name[:6]}*")[:5]
        hint = f"; similar: {', '.join(close)}" if close else "; see timm.list_models()"
        raise UserError(f"unknown timm model {name!r}{hint}")
    kwargs: dict[str, Any] = dict(in_chans=spec.in_chans, num_classes=spec.num_classes, img_size=spec.img_size)
    kwargs.update(spec.model_kw)
    try:
        try:
            return timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as err:
            # ConvNets take no img_size; only drop it if the user did not ask for it.
            if "img_size" not in str(err) or "img_size" in spec.model_kw:
                raise
            kwargs.pop("img_size")
            return timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        raise UserError(f"timm:{name} cannot be built with {kwargs}: {err}") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch file holding tensors only."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"{path} is not a readable safetensors file: {err}") from None
    from localitylab.io import safe_torch_load

    data = safe_torch_load(path)
    for key in ("model_state", "state_dict", "model"):  # common wrappers
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UserError(f"{path} holds no state dict of tensors")
    return data


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state dict into `model`; a shape or key mismatch is a UserError naming it."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with other shapes (e.g. {k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)})")
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise UserError(f"weights in {path} do not fit the model: " + "; ".join(parts))
    model.load_state_dict(state)

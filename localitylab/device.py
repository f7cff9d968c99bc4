"""Which torch device a command runs on: `auto` (CUDA when there is one), `cpu`, `cuda`, `cuda:N`.

At the bottom of the library with `io` and `errors`: training, probes and evaluation all
resolve `device` the same way.
"""

from __future__ import annotations

import torch

from localitylab.errors import UserError


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; valid: auto, cpu, cuda, cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda asked for, but no CUDA device is available here", setting="device")
    return resolved

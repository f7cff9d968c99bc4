"""The elementwise passes over a block of attention logits, eager or compiled.

A block of logits is read for its row maxima, then once more for the weights
w = exp(s - m), their sum Z and sum w (s - m) (the entropy's term); the attention-distance
probe reads w once more with the pixel distances, which it computes in place rather than
reading a table. Eagerly each of these is a separate pass over memory; `torch.compile`
fuses them into one or two loops, 4-9x faster on a CPU (benchmarks/RESULTS.md), which is
what brings the probe near the cost of the model's own fused attention on long sequences.

Compiling costs seconds to a minute the first time in a process (inductor caches its
kernels on disk), so it is used where it pays: `LOCALITYLAB_COMPILE_ATTENTION=auto` (the
default) compiles for layers with at least `COMPILE_FROM_KEYS` keys, `on` always, `off`
never. Where compiling fails (no C++ compiler), the eager functions are used and that is
remembered for the process.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

COMPILE_FROM_KEYS = 4096
_compiled: dict[str, Callable | None] = {}


def grid_pieces(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w, m, Z, sum w (s - m)) of logits `grid` (..., T): m the row maxima, w = exp(s - m);
    masked keys (-inf) get w = 0 and add nothing."""
    grid_max = grid.amax(dim=-1, keepdim=True)
    shifted = grid - grid_max
    weights = shifted.exp()
    total = weights.sum(dim=-1)
    weighted = torch.where(weights > 0, weights * shifted, torch.zeros_like(shifted)).sum(dim=-1)
    return weights, grid_max, total, weighted


def weighted_distance(weights: torch.Tensor, query_centres: torch.Tensor, key_centres: torch.Tensor) -> torch.Tensor:
    """sum_k w[..., q, k] |c_q - c_k| for weights (..., b, T), centres (b, 2) and (T, 2)."""
    dy = query_centres[:, None, 0] - key_centres[None, :, 0]
    dx = query_centres[:, None, 1] - key_centres[None, :, 1]
    return (weights * torch.sqrt(dy * dy + dx * dx)).sum(dim=-1)


def mode() -> str:
    value = os.environ.get("LOCALITYLAB_COMPILE_ATTENTION", "auto").strip().lower()
    return value if value in ("auto", "on", "off") else "auto"


def kernel(function: Callable, num_keys: int) -> Callable:
    """`function`, compiled where that pays (see the module's note), else as it is."""
    wanted = mode()
    if wanted == "off" or (wanted == "auto" and num_keys < COMPILE_FROM_KEYS):
        return function
    name = function.__name__
    if name not in _compiled:
        _compiled[name] = torch.compile(function, dynamic=True)
    compiled = _compiled[name]
    if compiled is None:
        return function

    def guarded(*args):
        try:
            return compiled(*args)
        except Exception as err:  # a machine without a compiler: the eager path, for the rest of the process
            warnings.warn(f"attention kernels run eagerly: torch.compile failed ({type(err).__name__})",
                          RuntimeWarning, stacklevel=2)
            _compiled[name] = None
            return function(*args)

    return guarded

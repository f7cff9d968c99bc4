"""The elementwise passes over a block of attention logits, eager or compiled (torch.compile).

A block of logits is read for its row maxima, then once more for the weights
w = exp(s - m), their sum Z and sum w (s - m) (the entropy's term); the attention-distance
probe reads w once more with the pixel distances, which it computes in place rather than
reading a table. Eagerly each of these is a separate pass over memory; `torch.compile`
fuses them into one or two loops, 4-9x faster on a CPU (benchmarks/RESULTS.md), which is
what brings the probe near the cost of the model's own SDPA attention on long sequences.

Compiling costs seconds to a minute the first time in a process (inductor caches its
kernels on disk), so it is used where it pays: `LOCALITYLAB_COMPILE_ATTENTION=auto` (the
default) compiles for layers with at least `COMPILE_FROM_KEYS` keys, `on` always, `off`
never. Where compiling fails (no C++ compiler), the eager functions are used and that is
remembered for the process.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import warnings
from typing import Callable

import torch

COMPILE_FROM_KEYS = 4096
_COMPILED: dict[str, Callable | None] = {}  # per function name; None: compiling failed

# glibc's mallopt parameters (malloc.h), and what the reader sets them to.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_SETTINGS = {M_MMAP_THRESHOLD: 64 << 20, M_TRIM_THRESHOLD: 128 << 20}


def grid_pieces(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w, m, Z, sum w (s - m)) of logits `grid` (..., T): m the row maxima, w = exp(s - m);
    masked keys (-inf) get w = 0 and add nothing."""
    grid_max = grid.amax(dim=-1, keepdim=True)
    # Masked keys are clamped from -inf to the most negative float: their weight is still 0,
    # and 0 times it is 0 where 0 * -inf would be NaN (a select would cost three more passes).
    shifted = (grid - grid_max).clamp_(min=torch.finfo(grid.dtype).min)
    weights = shifted.exp()
    return weights, grid_max, weights.sum(dim=-1), torch.linalg.vecdot(weights, shifted)


def weighted_distance(weights: torch.Tensor, query_centres: torch.Tensor, key_centres: torch.Tensor) -> torch.Tensor:
    """sum_k w[..., q, k] |c_q - c_k| for weights (..., b, T), centres (b, 2) and (T, 2)."""
    dy = query_centres[:, None, 0] - key_centres[None, :, 0]
    dx = query_centres[:, None, 1] - key_centres[None, :, 1]
    return torch.linalg.vecdot(weights, torch.sqrt(dy * dy + dx * dx))  # no (..., b, T) product kept


def mode() -> str:
    value = os.environ.get("LOCALITYLAB_COMPILE_ATTENTION", "auto").strip().lower()
    return value if value in ("auto", "on", "off") else "auto"


def compiled(function: Callable, num_keys: int) -> Callable:
    """`function`, compiled where that pays (see the module's note), else as it is."""
    wanted = mode()
    if wanted == "off" or (wanted == "auto" and num_keys < COMPILE_FROM_KEYS):
        return function
    name = function.__name__
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(function, dynamic=True)
    found = _COMPILED[name]
    if found is None:
        return function

    def guarded(*args):
        try:
            return found(*args)
        except Exception as err:  # a machine without a compiler: the eager path, for the rest of the process
            warnings.warn(f"attention reductions run eagerly: torch.compile failed ({type(err).__name__})",
                          RuntimeWarning, stacklevel=2)
            _COMPILED[name] = None
            return function(*args)

    return guarded


@functools.cache
def keep_block_memory() -> bool:
    """Let glibc's malloc serve the blocks' temporaries (a few MiB each, freed and asked for
    again every block) from its heap. By default it maps each allocation over an adaptive
    threshold afresh and unmaps it on free, and every new mapping is faulted in page by
    page: that made the attention-distance probe 1.1-1.8x slower on pit-n and PiT-T at
    1,025 and 4,097 tokens (benchmarks/RESULTS.md).
    Raises the mapping threshold to 64 MiB and keeps up to 128 MiB of freed heap, once per
    process, where the C library is glibc and the user set no malloc tuning of their own.
    Returns whether the settings are in force."""
    tuned = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    if (not sys.platform.startswith("linux") or any(name in os.environ for name in tuned)
            or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc's own symbol: mallopt means what this expects
    except (OSError, AttributeError):
        return False
    return all(libc.mallopt(option, value) == 1 for option, value in HEAP_SETTINGS.items())

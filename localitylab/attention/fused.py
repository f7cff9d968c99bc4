"""Attention with the attention-distance sums inside it, on the CPU (`csrc/attention_rows.cpp`).

The reader's torch path writes every block of logits to memory and reads it back for each
reduction; this kernel is flash attention whose online softmax also accumulates, per query
row, the sums attention-distance needs (grid max, Z, sum w (s - m), sum w d and the prefix
logsumexp), so a probed layer costs about one SDPA call (benchmarks/RESULTS.md). It is
compiled for this machine's CPU on first use (torch.utils.cpp_extension; about 15 s, cached
per user under a name keyed by the torch version, the CPU's instruction set and a hash of the
source and of torch's folder, so an environment with another torch or another kernel builds
its own; `make` does it when it creates .venv) and used where it applies: CPU, float32, no mask, not causal, and a
probe that needs only those sums. It is built with OpenMP, as torch itself is, so
`at::parallel_for` spreads query tiles over every intra-op thread (`torch.set_num_threads`).
It uses internal ATen APIs (`cpublas::brgemm`, the vectorised exp), so it is built only for the
torch versions it was tested with (`TESTED_TORCH`); any other torch takes the torch path and
says so once. `LOCALITYLAB_FUSED_ATTENTION=off` uses the torch path instead (it stays
the reference the kernel is tested against); where building fails (no compiler), the torch
path is used and that is said once.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

SOURCE = Path(__file__).parent / "csrc" / "attention_rows.cpp"
KEY_TILE = 512  # keys per tile: a 256 x 512 tile of logits (512 KiB) stays in a core's L2
# The torch releases (major.minor) the kernel was built and tested with: its ATen internals
# may move in any other.
TESTED_TORCH = ("2.14",)


class RowSums(NamedTuple):
    """The kernel's answer for query rows (R, heads, rows): the output rows and, over the grid
    keys, the pieces of `AttentionBlock` (float64)."""

    out: torch.Tensor
    grid_max: torch.Tensor
    grid_total: torch.Tensor
    weighted_shifted: torch.Tensor
    weighted_distance: torch.Tensor
    prefix_lse: torch.Tensor  # -inf without prefix keys


def wanted() -> bool:
    return os.environ.get("LOCALITYLAB_FUSED_ATTENTION", "auto").strip().lower() != "off"


def _flags(capability: str) -> list[str]:
    flags = ["-O3", "-fopenmp"]  # OpenMP: ATen's parallel_for is parallel only under _OPENMP
    if capability.startswith("AVX512"):
        flags += ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma",
                  "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    elif capability == "AVX2":
        flags += ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return flags


@contextlib.contextmanager
def _build_tools():
    """torch runs `ninja` from PATH; the one pip installed sits beside this Python, which a
    venv's python run by path does not put on PATH. Quiets torch's note that this machine
    has no CUDA runtime (the kernel is for the CPU)."""
    path = os.environ.get("PATH", "")
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    if shutil.which("ninja") is None:
        with contextlib.suppress(ImportError):
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
    try:
        yield
    finally:
        os.environ["PATH"] = path
        quiet.setLevel(level)


def tested_torch(version: str) -> bool:
    """Whether torch `version` (e.g. "2.14.1+cu130") is one the kernel was tested with."""
    return ".".join(version.split("+")[0].split(".")[:2]) in TESTED_TORCH


def build_name(torch_version: str, capability: str, source: bytes, torch_home: str = "") -> str:
    """The built library's name, and so its build folder: one per torch version, instruction
    set, kernel source and torch installation (`torch_home`, the folder of its headers: two
    environments with the same torch compile with different include paths, and each rebuilt
    the library whenever the other had built it last). A library built against another torch
    is never loaded."""
    version = "".join(c if c.isalnum() else "_" for c in torch_version.split("+")[0])
    digest = hashlib.sha256(source + b"\0" + torch_home.encode()).hexdigest()[:12]
    return f"localitylab_attention_rows_{capability.lower()}_torch{version}_{digest}"


def _source_in_build_folder(name: str) -> Path:
    """The kernel's source, copied into its build folder once: torch's build file names the
    source by its path, so checkouts in different folders sharing one build folder (the name
    is the same for the same source) each rebuilt the library (12-170 s) when another had
    built it last. The copy is written only where it is missing or differs (its mtime is
    what ninja compares with the built object)."""
    from torch.utils.cpp_extension import _get_build_directory

    source = SOURCE.read_bytes()
    copy = Path(_get_build_directory(name, False)) / SOURCE.name
    if not copy.exists() or copy.read_bytes() != source:
        partial = copy.with_name(f"{copy.name}.{os.getpid()}.tmp")
        partial.write_bytes(source)
        os.replace(partial, copy)
    return copy


@functools.cache
def load() -> bool:
    """Build (once per machine and torch) and load the kernel; whether it is there."""
    if not tested_torch(torch.__version__):
        warnings.warn(f"attention probes use the torch path: the fused CPU kernel is built only for torch "
                      f"{', '.join(TESTED_TORCH)} (this is torch {torch.__version__})", RuntimeWarning, stacklevel=2)
        return False
    if hasattr(torch.ops.localitylab, "attention_rows"):
        return True
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        with _build_tools():
            from torch.utils.cpp_extension import load as build

            name = build_name(torch.__version__, capability, SOURCE.read_bytes(), str(Path(torch.__file__).parent))
            build(name=name, sources=[str(_source_in_build_folder(name))], extra_cflags=_flags(capability),
                  extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        return True
    except Exception as err:  # no compiler, no ninja, a torch without the headers: the torch path
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        warnings.warn(f"attention probes use the torch path: the fused CPU kernel did not build "
                      f"({type(err).__name__}: {first_line})", RuntimeWarning, stacklevel=2)
        return False


def applies(q: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> bool:
    return (wanted() and q.device.type == "cpu" and q.dtype == torch.float32 and attn_mask is None
            and not is_causal and load())


def query_tile(num_queries: int) -> int:
    """Query rows per tile, as torch's CPU flash attention splits them: larger for longer sequences."""
    return 256 if num_queries >= 768 else 64 if num_queries >= 192 else 32


def attention_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, num_prefix_keys: int,
                   query_centres: torch.Tensor, key_centres: torch.Tensor, tile: int | None = None) -> RowSums:
    """softmax(q k^T scale) v for query rows q (R, heads, rows, D), with the grid sums.
    query_centres (rows, 2) and key_centres (Nk - prefix, 2) are pixel anchors (y, x)."""
    found = torch.ops.localitylab.attention_rows(
        q, k, v, float(scale), int(num_prefix_keys), query_centres, key_centres, int(tile or query_tile(q.shape[-2])),
        KEY_TILE)
    return RowSums(*found)


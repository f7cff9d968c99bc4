"""What every benchmark shares: timing, the device's measured matmul peak, FLOP counts,
peak tensor memory, and the benchmark-only data sets.

Every figure is the median of several timed runs after warm-up runs that are not counted;
the number of each is recorded beside the figure.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
import weakref
from datetime import datetime, timezone
from typing import Callable

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode  # what FlopCounterMode is built on


# --- device and environment ----------------------------------------------------------------

def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str) -> dict:
    """Where and when: printed above the tables and stored with the figures."""
    import timm

    device = torch.device(device)
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": device_name(device),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "machine": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
    }


# --- timing ----------------------------------------------------------------------------------

def timed_runs(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device | str = "cpu") -> list[float]:
    """Seconds of each of `repeats` calls of `fn` after `warmup` uncounted ones (synchronised
    on CUDA, so the time is the device's, not the launch's)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return seconds


def matmul_peak(device: torch.device | str, quick: bool = False) -> dict:
    """The device's matrix-multiply rate, measured now: a large square matmul, float32 on CPU,
    bf16 on CUDA (timed with CUDA events), median of several after warm-up. FLOPs = 2 n^3."""
    device = torch.device(device)
    if device.type == "cuda":
        n, dtype, warmup, repeats = 8192, torch.bfloat16, 5, 20
    else:
        n, dtype, warmup, repeats = 2048, torch.float32, 2, 3 if quick else 7
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    if device.type == "cuda":
        for _ in range(warmup):
            a @ b
        seconds = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1000)
    else:
        seconds = timed_runs(lambda: a @ b, warmup, repeats, device)
    median = statistics.median(seconds)
    return {"device": device.type, "device_name": device_name(device), "dtype": str(dtype).replace("torch.", ""),
            "n": n, "flops": 2 * n**3 / median, "seconds": median, "runs": repeats, "warmup_runs": warmup,
            "threads": torch.get_num_threads(), "spread": max(seconds) / min(seconds)}


# --- FLOPs -----------------------------------------------------------------------------------

def train_step_flops(model: nn.Module, batch: torch.Tensor, labels: torch.Tensor) -> int:
    """FLOPs of one training step's forward and backward (torch.utils.flop_counter: matmuls,
    convolutions and attention, a multiply-add counts 2; attention's backward without a
    fused kernel's recomputation: see flop_counter), parameters left untouched."""
    from localitylab.models.describe import flop_counter

    was_training = model.training
    model.train()
    with flop_counter() as counter:
        loss = nn.functional.cross_entropy(model(batch), labels)
        loss.backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return int(counter.get_total_flops())


def train_flops_per_image(model_name: str, info, device: torch.device | str = "cpu", pos_embed: str = "learn") -> int:
    """Training FLOPs (forward + backward) per image for `model_name` on data shaped like `info`,
    counted on a batch of two (BatchNorm needs more than one value per channel)."""
    from localitylab.models.registry import build_model
    from localitylab.train import TrainConfig
    from localitylab.train.loop import model_spec_for

    spec = model_spec_for(TrainConfig(model_name, info.name, pos_embed=pos_embed), info)
    torch.manual_seed(0)
    model = build_model(spec).to(device)
    batch = torch.randn(2, spec.in_chans, spec.img_size, spec.img_size, device=device)
    labels = torch.zeros(2, dtype=torch.long, device=device)
    return train_step_flops(model, batch, labels) // 2


# --- peak tensor memory ----------------------------------------------------------------------

class PeakTensorMemory:
    """Peak bytes of tensor storage allocated inside the block and alive at once.

    On CUDA it is torch.cuda.max_memory_allocated over the block, less what was allocated
    before it. On CPU, where torch keeps no such statistic, a dispatch mode sees every
    tensor an operator returns (autograd's saved tensors, gradients and optimiser state
    included) and counts each storage from its creation until it is freed: the same
    quantity, without the allocator's rounding. Tensors that existed before the block
    (parameters, the input batch) are not counted. Time nothing inside it: on CPU the
    bookkeeping slows every operator.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.peak_bytes = 0

    def __enter__(self) -> "PeakTensorMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self._before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._mode = _StorageTracker()
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._before
        else:
            self._mode.__exit__(*exc)
            self.peak_bytes = self._mode.peak


class _StorageTracker(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}  # id(storage) -> bytes

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def _track(self, value, inputs: set[int]) -> None:
        if not isinstance(value, torch.Tensor) or value.device.type != "cpu" or value.is_sparse:
            return
        storage = value.untyped_storage()
        key = id(storage)
        if key in self._live or key in inputs:  # a view or an in-place result: nothing new
            return
        size = storage.nbytes()
        self._live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_leaves

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {id(leaf.untyped_storage()) for leaf in tree_leaves((args, kwargs))
                  if isinstance(leaf, torch.Tensor) and leaf.device.type == "cpu" and not leaf.is_sparse}
        for leaf in tree_leaves(out):
            self._track(leaf, inputs)
        return out


# --- data sets for benchmarks ----------------------------------------------------------------

BENCH_PREFIX = "bench"


def register_bench_datasets() -> None:
    """`bench:cifar100:N:M`: N training and M test images of random uint8 noise shaped like
    CIFAR-100 (3x32x32, 100 classes, crop padding 4 and flips, as cifar100 has);
    `bench:digits:N:M`: the first N training and M test images of digits (same shapes,
    batches and recipe as digits; quick runs use it to time fewer steps).
    Registered once per process; the training loop and the usual way both load them by name."""
    from localitylab.data.registry import dataset_entries, register_dataset

    if any(entry.name == BENCH_PREFIX for entry in dataset_entries()):
        return
    register_dataset(BENCH_PREFIX, "benchmarks only: bench:cifar100:N:M (synthetic) or bench:digits:N:M (subset)",
                     prefix=True)(_load_bench)


def cifar_shaped(train: int, test: int = 64) -> str:
    return f"{BENCH_PREFIX}:cifar100:{train}:{test}"


def digits_subset(train: int, test: int = 128) -> str:
    return f"{BENCH_PREFIX}:digits:{train}:{test}"


def _load_bench(arg: str, options):
    from localitylab.data.registry import DataInfo, ImageDataset, load_dataset, make_dataset
    from localitylab.errors import UserError

    try:
        kind, train, test = arg.split(":")
        train, test = int(train), int(test)
    except ValueError:
        raise UserError(f"bench:{arg}: expected bench:cifar100:N:M or bench:digits:N:M") from None
    name = f"{BENCH_PREFIX}:{arg}"
    if kind == "cifar100":
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (train + test, 3, 32, 32), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, 100, (train + test,), generator=generator)
        return make_dataset(name, images[:train], labels[:train], images[train:], labels[train:],
                            class_names=[f"class{i}" for i in range(100)], hflip=True, crop_padding=4)
    if kind == "digits":
        full = load_dataset("digits", options)
        info = DataInfo(**{**full.info.to_dict(), "name": name})
        return ImageDataset(info, full.train_images[:train], full.train_labels[:train], full.test_images[:test],
                            full.test_labels[:test])
    raise UserError(f"bench:{arg}: unknown kind {kind!r}; valid: cifar100, digits")


def median(values: list[float]) -> float:
    return statistics.median(values)

"""Training throughput and model FLOPs utilisation (MFU), localitylab's loop against the usual way.

Ours is the public `localitylab.train.train(TrainConfig(...))`, defaults untouched (on CUDA
that means bf16 autocast and torch.compile); its history rows carry each epoch's images/s,
timed by the loop from the first to the last step (evaluation and checkpoints excluded).
The first epoch is warm-up (compilation, allocator, kernel choice) and is not counted; the
figure is the median of the later ones. The usual way (`usual_way.py`) runs the same model,
data, batch size and number of epochs right after ours, so both see the same machine.

MFU = training FLOPs per image (forward + backward of one step, counted by
torch.utils.flop_counter.FlopCounterMode) x images/s / the matmul peak measured in this run
(`common.matmul_peak`: float32 on CPU, bf16 on CUDA).

Cases: the nano models on digits (batch 128), and pit-t, vit-t/2 and resnet-18 on
synthetic CIFAR-100-shaped data (3x32x32 uint8, 100 classes, crop padding 4 and flips).
On a CPU the CIFAR-shape models are slow (pit-t: ~66 GFLOP per training image), so they run
one step per epoch at a small batch; --quick keeps only resnet-18 at batch 2.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import common

NANO_MODELS = ("pit-n", "vit-n/2", "resnet-n")
CIFAR_MODELS = ("pit-t", "vit-t/2", "resnet-18")


@dataclass(frozen=True)
class Case:
    model: str
    data: str  # the name the loop loads
    label: str  # what the table shows
    batch_size: int
    epochs: int  # the first is warm-up


def cases(quick: bool, device: torch.device) -> list[Case]:
    on_cuda = device.type == "cuda"
    if quick:
        # One step per epoch on 128 digits; resnet-18 alone of the CIFAR-shape models.
        nano = [Case(m, common.digits_subset(128, 16), "digits", 128, 3) for m in NANO_MODELS]
        return nano + [Case("resnet-18", common.cifar_shaped(2, 2), "cifar100-shape", 2, 3)]
    nano = [Case(m, "digits", "digits", 128, 5) for m in NANO_MODELS]
    if on_cuda:
        big = [Case(m, common.cifar_shaped(10_240, 1_024), "cifar100-shape", 128, 4) for m in CIFAR_MODELS]
    else:
        cpu_batch = {"pit-t": 2, "vit-t/2": 8, "resnet-18": 8}
        big = [Case(m, common.cifar_shaped(cpu_batch[m], cpu_batch[m]), "cifar100-shape", cpu_batch[m], 4)
               for m in CIFAR_MODELS]
    return nano + big


def measure_ours(case: Case, device: torch.device) -> list[float]:
    """images/s of each timed epoch of the loop."""
    from localitylab.train import TrainConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        result = train(TrainConfig(case.model, case.data, out=Path(tmp) / "run", epochs=case.epochs,
                                   batch_size=case.batch_size, warmup_epochs=0, device=device.type))
    return [float(row["images_per_s"]) for row in result.history[1:]]


def measure(case: Case, device: torch.device, peak_flops: float, usual: bool = True) -> dict:
    from localitylab.data.registry import load_dataset

    from benchmarks import usual_way

    common.register_bench_datasets()
    dataset = load_dataset(case.data)
    info = dataset.info
    flops = common.train_flops_per_image(case.model, info, device)
    ours = measure_ours(case, device)
    row = {
        "model": case.model, "data": case.label, "dataset": case.data, "batch_size": case.batch_size,
        "device": device.type, "threads": torch.get_num_threads(),
        "steps_per_epoch": max(1, len(dataset.train_images) // case.batch_size), "runs": len(ours), "warmup_runs": 1,
        "images_per_s": common.median(ours), "images_per_s_runs": ours,
        "flops_per_image": flops, "peak_flops": peak_flops,
    }
    row["achieved_flops"] = row["images_per_s"] * flops
    row["mfu"] = row["achieved_flops"] / peak_flops
    if usual:
        rates = usual_way.usual_way(case.model, case.data, case.batch_size, case.epochs, device=device.type)
        row.update(usual_images_per_s=common.median(rates), usual_images_per_s_runs=rates,
                   usual_workers=usual_way.default_workers(), usual_mfu=common.median(rates) * flops / peak_flops)
        row["ratio"] = row["images_per_s"] / row["usual_images_per_s"]
    return row


def run(quick: bool = False, peak: dict | None = None, usual: bool = True) -> list[dict]:
    """One row per case: ours (images/s, FLOPs, MFU) and, with `usual`, the usual way and the ratio."""
    device = common.bench_device()
    peak = peak or common.matmul_peak(device, quick)
    rows = []
    for case in cases(quick, device):
        rows.append(measure(case, device, peak["flops"], usual))
    for row in rows:
        for key in ("images_per_s", "mfu", "flops_per_image"):
            if not (math.isfinite(row[key]) and row[key] > 0):
                raise RuntimeError(f"{row['model']}: {key} = {row[key]} is not a positive finite figure")
    return rows


def comparison(rows: list[dict]) -> list[dict]:
    """Ours against the usual way, from the same run's figures."""
    keys = ("model", "data", "batch_size", "device", "threads", "runs", "usual_workers")
    return [{**{k: row[k] for k in keys}, "ours_images_per_s": row["images_per_s"],
             "usual_images_per_s": row["usual_images_per_s"], "ratio": row["ratio"]}
            for row in rows if "ratio" in row]


def print_table(rows: list[dict], peak: dict) -> None:
    print(f"matmul peak: {peak['flops'] / 1e9:,.1f} GFLOP/s ({peak['dtype']}, {peak['n']}x{peak['n']}, "
          f"median of {peak['runs']} after {peak['warmup_runs']} warm-up, {peak['threads']} threads)")
    print(f"{'model':<10} {'data':<15} {'batch':>5} {'steps':>5} {'runs':>4} {'images/s':>10} "
          f"{'GFLOP/img':>10} {'GFLOP/s':>8} {'MFU':>6} {'usual img/s':>12} {'ours/usual':>10}")
    for row in rows:
        usual = (f"{row['usual_images_per_s']:>12.1f} {row['ratio']:>10.2f}" if "ratio" in row
                 else f"{'-':>12} {'-':>10}")
        print(f"{row['model']:<10} {row['data']:<15} {row['batch_size']:>5} {row['steps_per_epoch']:>5} "
              f"{row['runs']:>4} {row['images_per_s']:>10.1f} {row['flops_per_image'] / 1e9:>10.3f} "
              f"{row['achieved_flops'] / 1e9:>8.1f} {row['mfu']:>6.3f} {usual}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_throughput")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-usual", action="store_true", help="ours only")
    args = parser.parse_args()
    device = common.bench_device()
    peak = common.matmul_peak(device, args.quick)
    result = run(args.quick, peak, usual=not args.no_usual)
    print_table(result, peak)

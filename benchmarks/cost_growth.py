"""How a Pixel Transformer's training cost grows with the image: step time and peak memory.

One training step (normalise, forward, cross-entropy, backward, AdamW; bf16 autocast on
CUDA, as the loop does) of an untrained PiT on random uint8 images at 16x16, 32x32 and
64x64 pixels (257 / 1,025 / 4,097 tokens): median step time of several after warm-up, and
the peak tensor memory of one more step (`common.PeakTensorMemory`: everything the step
allocates and holds at once, parameters and the input excluded). pit-n on a CPU, pit-t on
CUDA. --quick: 16 and 32 pixels.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from benchmarks import common

SIZES = (16, 32, 64)


def settings(quick: bool, device: torch.device) -> dict:
    if device.type == "cuda":
        return {"model": "pit-t", "batch_size": 32, "sizes": SIZES, "warmup": 3, "repeats": 10}
    return {"model": "pit-n", "batch_size": 2, "sizes": SIZES[:2] if quick else SIZES, "warmup": 1,
            "repeats": 2 if quick else 3}


def measure(model_name: str, img_size: int, batch_size: int, device: torch.device, warmup: int, repeats: int) -> dict:
    from localitylab.data.registry import DataInfo
    from localitylab.models.registry import ModelSpec, build_model

    info = DataInfo("random", img_size, 3, [str(i) for i in range(10)], [0.5] * 3, [0.25] * 3)
    spec = ModelSpec(model_name, img_size, 3, info.num_classes, "learn")
    torch.manual_seed(0)
    model = build_model(spec).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 3, img_size, img_size), dtype=torch.uint8, generator=generator)
    images = images.to(device)
    labels = torch.randint(0, info.num_classes, (batch_size,), generator=generator).to(device)
    amp = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = nn.functional.cross_entropy(model(info.normalise(images)).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = common.timed_runs(step, warmup, repeats, device)
    with common.PeakTensorMemory(device) as memory:
        step()
    flops = common.train_step_flops(model, info.normalise(images[:2]), labels[:2]) // 2
    step_s = common.median(seconds)
    return {"model": model_name, "img_size": img_size, "tokens": img_size * img_size + 1, "batch_size": batch_size,
            "device": device.type, "threads": torch.get_num_threads(), "runs": repeats, "warmup_runs": warmup,
            "step_s": step_s, "step_s_runs": seconds, "images_per_s": batch_size / step_s,
            "peak_mb": memory.peak_bytes / 2**20, "flops_per_image": flops}


def run(quick: bool = False) -> list[dict]:
    device = common.bench_device()
    plan = settings(quick, device)
    rows = [measure(plan["model"], size, plan["batch_size"], device, plan["warmup"], plan["repeats"])
            for size in plan["sizes"]]
    first = rows[0]
    for row in rows:
        row["time_vs_smallest"] = row["step_s"] / first["step_s"]
        row["memory_vs_smallest"] = row["peak_mb"] / first["peak_mb"]
        row["tokens_vs_smallest"] = row["tokens"] / first["tokens"]
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'model':<6} {'pixels':>6} {'tokens':>6} {'batch':>5} {'runs':>4} {'step s':>8} {'x':>6} "
          f"{'peak MB':>8} {'x':>6} {'GFLOP/img':>10}")
    for row in rows:
        print(f"{row['model']:<6} {row['img_size']:>6} {row['tokens']:>6} {row['batch_size']:>5} {row['runs']:>4} "
              f"{row['step_s']:>8.3f} {row['time_vs_smallest']:>6.1f} {row['peak_mb']:>8.1f} "
              f"{row['memory_vs_smallest']:>6.1f} {row['flops_per_image'] / 1e9:>10.3f}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.cost_growth")
    parser.add_argument("--quick", action="store_true")
    print_table(run(parser.parse_args().quick))

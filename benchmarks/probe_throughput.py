"""Probe throughput: images/s of every registered probe on an untrained Pixel Transformer.

Each probe's measurement (`Probe.run`: what `localitylab probe` computes, without writing
its figures and files) on a seeded subset of the test split, default options. Warm-up: one
run on a single image (lazy imports, allocator, kernel choice), not counted; then the median
of several runs on all the images. images/s = images / median seconds; pe-similarity reads no
images (only the position-embedding table), so its images/s is that of a run over them. A
probe that does not apply to the model (mae-reconstruction needs an MAE checkpoint) is
listed with its reason and no figure.

pit-t at 32x32 (synthetic CIFAR-100-shaped data: 1,025 tokens) on CUDA with 64 images and
on a CPU with 2; --quick: pit-n on digits, 2 images, 2 integrated-gradients steps.
"""

from __future__ import annotations

import torch

from benchmarks import common


def settings(quick: bool, device: torch.device) -> dict:
    if quick:
        return {"model": "pit-n", "data": "digits", "label": "digits", "images": 2, "repeats": 1,
                "options": {"receptive-field": {"ig_steps": 2}}}
    return {"model": "pit-t", "data": common.cifar_shaped(64, 64), "label": "cifar100-shape",
            "images": 64 if device.type == "cuda" else 2, "repeats": 3 if device.type == "cuda" else 2,
            "options": {}}


def run(quick: bool = False, probes: list[str] | None = None) -> list[dict]:
    from localitylab.probes.registry import get_probe, probe_names
    from localitylab.probes.sources import load_target, select_images

    common.register_bench_datasets()
    device = common.bench_device()
    plan = settings(quick, device)
    target, dataset = load_target(plan["model"], device.type, plan["data"])
    images, labels = select_images(dataset, plan["images"], seed=0)
    rows = []
    for name in probes or probe_names():
        probe = get_probe(name)
        options = plan["options"].get(name, {})
        row = {"probe": name, "model": plan["model"], "data": plan["label"], "img_size": target.spec.img_size,
               "tokens": target.info.tokens_per_image, "device": device.type, "threads": torch.get_num_threads(),
               "images": len(images), "runs": 0, "warmup_runs": 0, "seconds": None, "seconds_runs": [],
               "images_per_s": None, "options": options, "note": probe.not_applicable(target) or ""}
        if row["note"]:  # the probe does not apply to this model: nothing to time
            rows.append(row)
            continue
        tables = []

        def once(count: int) -> None:
            tables.append(probe.run(target, images[:count], labels[:count], dict(options), 64, 0).table)

        once(1)  # warm-up
        seconds = common.timed_runs(lambda: once(len(images)), 0, plan["repeats"], device)
        median = common.median(seconds)
        if (tables[-1]["n_images"].fillna(0) == 0).all():
            row["note"] = "reads no images: the time of one run, per image it was given"
        row.update(runs=plan["repeats"], warmup_runs=1, seconds=median, seconds_runs=seconds,
                   images_per_s=len(images) / median)
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'probe':<20} {'model':<6} {'tokens':>6} {'images':>6} {'runs':>4} {'seconds':>8} {'images/s':>9}")
    for row in rows:
        timed = row["seconds"] is not None
        seconds = f"{row['seconds']:>8.2f} {row['images_per_s']:>9.2f}" if timed else f"{'-':>8} {'-':>9}"
        print(f"{row['probe']:<20} {row['model']:<6} {row['tokens']:>6} {row['images']:>6} {row['runs']:>4} "
              f"{seconds}  {row['note']}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.probe_throughput")
    parser.add_argument("--quick", action="store_true")
    print_table(run(parser.parse_args().quick))

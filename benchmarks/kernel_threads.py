"""The fused attention-distance kernel and the whole attention-distance probe at one thread
and at every thread, each against what it stands beside at the same thread count.

- kernel: one layer of one image (`attention_parts.layer_call`: 1 prefix token and a square
  grid, pit-n's 4 heads of width 16 or PiT-T's 3 of width 64), `fused.attention_rows` on every
  grid row against `scaled_dot_product_attention` on the same q, k, v; `ratio` = kernel / SDPA;
- probe: attention-distance on an untrained pit-n (a token per pixel) on `images` random
  images in one batch, against a plain forward of the same images; `ratio` = probe / forward.

Thread counts: 1 and torch's own default (every core), switched in this process with
`torch.set_num_threads`; the timed runs alternate between the counts, so a change in what
else the machine runs falls on both. Each figure is the median of the runs (`*_runs` keeps
every run, `best` the fastest, the least disturbed). `speedup` = time at 1 thread / time at
every thread. --quick: the kernel at 1,025 tokens (pit-n's heads) and the probe at 1,025
tokens on 2 images, a few runs: a smoke test, and the suite's check that the kernel's work
really spreads over two threads.

    .venv/bin/python -m benchmarks.kernel_threads [--quick] [--tokens 1025 4097] [--images 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.attention_parts import SHAPES, grid_side, layer_call
from benchmarks.common import environment, median


def thread_counts() -> list[int]:
    """1 and torch's default for this machine (every core), once each."""
    every = max(1, torch.get_num_threads())
    return sorted({1, every})


def alternating(functions: dict[str, Callable[[], object]], counts: list[int], warmup: int,
                repeats: int) -> dict[tuple[str, int], list[float]]:
    """Seconds of each function at each thread count, the counts (and functions) taken in turn
    within every repeat; the thread count is restored after."""
    saved = torch.get_num_threads()
    seconds: dict[tuple[str, int], list[float]] = {(name, n): [] for name in functions for n in counts}
    try:
        for run in range(warmup + repeats):
            for n in counts:
                torch.set_num_threads(n)
                for name, function in functions.items():
                    started = time.perf_counter()
                    function()
                    if run >= warmup:
                        seconds[(name, n)].append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(saved)
    return seconds


def _rows(kind: str, what: dict, seconds: dict, names: tuple[str, str], counts: list[int]) -> list[dict]:
    """One row per thread count: the measured and the baseline's median, their ratio, and the
    speedup of each over its own 1-thread time."""
    measured, baseline = names
    rows = []
    for n in counts:
        ours, base = seconds[(measured, n)], seconds[(baseline, n)]
        rows.append({"kind": kind, **what, "threads": n, "seconds": median(ours), "baseline": baseline,
                     "baseline_seconds": median(base), "ratio": median(ours) / median(base), "best": min(ours),
                     "baseline_best": min(base), "seconds_runs": ours, "baseline_seconds_runs": base,
                     "runs": len(ours)})
    for row in rows:
        one = next(r for r in rows if r["threads"] == 1)
        row["speedup"] = one["seconds"] / row["seconds"]
        row["best_speedup"] = one["best"] / row["best"]
        row["baseline_speedup"] = one["baseline_seconds"] / row["baseline_seconds"]
    return rows


def measure_kernel(model: str, tokens: int, counts: list[int], warmup: int = 1, repeats: int = 5) -> list[dict]:
    """The kernel against SDPA on one layer of one image; checks both give the same output first."""
    from localitylab.attention import fused

    heads, width = SHAPES[model]
    call, where = layer_call(tokens, heads, width)
    rows = where.grid_rows()
    q, k, v = call.q, call.k, call.v
    query_centres, key_centres = where.query_centres[rows].float(), where.key_centres.float()

    def kernel():
        return fused.attention_rows(q[..., rows, :], k, v, call.scale_factor, 1, query_centres, key_centres)

    torch.testing.assert_close(kernel().out, F.scaled_dot_product_attention(q, k, v)[..., rows, :],
                               rtol=1e-4, atol=1e-5)
    seconds = alternating({"kernel": kernel, "sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}, counts,
                          warmup, repeats)
    return _rows("kernel", {"model": model, "tokens": tokens, "images": 1}, seconds, ("kernel", "sdpa"), counts)


def measure_probe(tokens: int, images: int, counts: list[int], warmup: int = 1, repeats: int = 3) -> list[dict]:
    """attention-distance on an untrained pit-n against a plain forward of the same images."""
    from benchmarks.attention_distance import _target
    from localitylab.probes.registry import get_probe

    side = grid_side(tokens)
    target, _ = _target("pit-n", side)
    batch = torch.randint(0, 256, (images, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    inputs, labels = target.prepare(batch), torch.zeros(images, dtype=torch.long)
    probe = get_probe("attention-distance")

    def forward():
        with torch.no_grad():
            return target.model(inputs)

    seconds = alternating({"probe": lambda: probe.run(target, batch, labels, batch_size=images), "forward": forward},
                          counts, warmup, repeats)
    return _rows("probe", {"model": "pit-n", "tokens": tokens, "images": images}, seconds, ("probe", "forward"),
                 counts)


def run(quick: bool = False, tokens: list[int] | None = None, images: int = 8,
        counts: list[int] | None = None) -> list[dict]:
    counts = counts or thread_counts()
    if quick:
        return measure_kernel("pit-n", 1025, counts, 1, 7) + measure_probe(1025, 2, counts, 1, 1)
    rows = []
    for n in tokens or [1025, 4097]:
        rows += measure_kernel("pit-n", n, counts) + measure_kernel("pit-t", n, counts)
        rows += measure_probe(n, images, counts, 1, 3)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'what':<7} {'model':<6} {'tokens':>6} {'images':>6} {'threads':>7}  {'seconds':>9}  {'against':<8}"
          f" {'seconds':>9}  {'ratio':>6}  {'speedup':>7}  {'its':>5}")
    for r in rows:
        print(f"{r['kind']:<7} {r['model']:<6} {r['tokens']:>6} {r['images']:>6} {r['threads']:>7}  "
              f"{r['seconds'] * 1e3:7.1f}ms  {r['baseline']:<8} {r['baseline_seconds'] * 1e3:7.1f}ms  "
              f"{r['ratio']:5.2f}x  {r['speedup']:6.2f}x  {r['baseline_speedup']:4.2f}x")
    print("(medians; ratio = ours / against at the same threads; speedup = 1 thread / these threads, "
          "ours then its)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_threads", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small version (smoke test)")
    parser.add_argument("--tokens", nargs="+", type=int, default=[1025, 4097], help="1 + a square each")
    parser.add_argument("--images", type=int, default=8, help="images in the probe's batch")
    parser.add_argument("--json", help="also write every figure here")
    args = parser.parse_args(argv)
    bad = [t for t in args.tokens if grid_side(t) is None]
    if bad:
        parser.error(f"--tokens must each be 1 + a square (1025 = 1 + 32^2), got {bad}")
    if args.images < 1:
        parser.error("--images must be at least 1")
    from localitylab.attention import fused

    if not fused.load():
        print("the fused kernel did not build here: nothing to measure", file=sys.stderr)
        return 1
    rows = run(args.quick, args.tokens, args.images)
    env = environment("cpu")
    print(f"{env['date']}  {env['cpu_count']} CPUs, torch {env['torch']}, load average "
          f"{', '.join(f'{x:.2f}' for x in env['load_average'] or [])}")
    print_table(rows)
    if args.json:
        from pathlib import Path

        from localitylab.io import write_json

        write_json(Path(args.json), {"environment": env, "quick": args.quick, "results": rows})
    return 0 if all(math.isfinite(r["ratio"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

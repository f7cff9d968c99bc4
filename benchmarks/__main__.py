"""python -m benchmarks [--quick] [--only SECTION ...] [--skip SECTION ...] [--json PATH]

Measures, prints a table per section and writes every figure as JSON (atomically, after
each section, so a failure keeps what was measured):

  train-throughput    images/s and MFU of pit-n, vit-n/2, resnet-n on digits and of pit-t,
                      vit-t/2, resnet-18 on synthetic CIFAR-100-shaped data, each against
                      the usual way (DataLoader + per-image torchvision transforms) in the
                      same run; MFU against the matmul peak measured in this run
  cost-growth         step time and peak memory of a PiT at 16, 32 and 64 pixels
  attention-distance  streamed vs materialised attention distance, 1,025 to 50,177 tokens
                      (each case in its own process; on a CPU the 50,177-token case
                      alone takes ~15 minutes: --skip attention-distance to leave it out)
  probe-throughput    images/s of every registered probe on an untrained pit-t at 32x32
  kernel-threads      the fused attention-distance kernel against SDPA and the probe against
                      a forward, at 1 thread and at every thread (benchmarks/kernel_threads.py;
                      skipped where the kernel does not build)
  probe-costs         `probe all` per probe on an untrained ViT-S/16 (4 images, 224 px): seconds
                      spent against the forwards and backwards its definition needs
                      (benchmarks/probe_costs.py; minutes on 2 cores, so not in --quick)
  whole-process       `localitylab train` against the usual way's script, each a whole process,
                      pit-n, vit-n/2, resnet-n on digits, 15 epochs, 3 interleaved rounds
                      (benchmarks/whole_process.py, which also runs the default 100 epochs;
                      minutes on 2 cores, so not in --quick)

Every figure is a median of several runs after warm-up; the JSON records how many. --quick
runs a small version of every section on one thread (a smoke test: seconds, not figures
to quote).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from benchmarks import (attention_distance, common, cost_growth, kernel_threads, probe_costs, probe_throughput,
                        train_throughput, whole_process)

SECTIONS = ("train-throughput", "cost-growth", "attention-distance", "probe-throughput", "kernel-threads",
            "probe-costs", "whole-process")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small version of every section (smoke test)")
    parser.add_argument("--only", action="append", choices=SECTIONS, metavar="SECTION",
                        help=f"run only this section (repeatable): {', '.join(SECTIONS)}")
    parser.add_argument("--skip", action="append", choices=SECTIONS, default=[], metavar="SECTION",
                        help="skip this section (repeatable)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice; 1 with "
                        "--quick); also passed to the per-case processes")
    parser.add_argument("--json", default="benchmarks/results.json", help="where to write the figures")
    args = parser.parse_args(argv)
    if args.quick and args.threads is None:
        # A smoke test's figures are not quoted, its time matters: on a shared machine two
        # spinning OpenMP threads can make it 5-20x slower, one thread cannot.
        args.threads = 1
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        import os

        import torch

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the attention-distance processes
    sections = [s for s in SECTIONS if (not args.only or s in args.only) and s not in args.skip]

    from localitylab.io import write_json

    device = common.bench_device()
    env = common.environment(device)
    command = "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])
    results: dict = {"environment": env, "command": command.strip(), "quick": args.quick, "sections": sections,
                     "seconds": {}, "cpu_seconds": {}}
    print(f"{env['date']}  device {env['device']} ({env['device_name']}), {env['cpu_count']} CPUs, "
          f"torch {env['torch']} with {env['torch_threads']} threads, load average "
          f"{', '.join(f'{x:.2f}' for x in env['load_average'] or [])}")
    print(f"command: {results['command']}{'  (quick: a smoke test, not figures to quote)' if args.quick else ''}")

    def section(name: str, measure) -> None:
        print(f"\n== {name} ==")
        started, cpu = time.perf_counter(), _cpu_seconds()
        measure()
        results["seconds"][name] = time.perf_counter() - started
        results["cpu_seconds"][name] = _cpu_seconds() - cpu
        write_json(args.json, results)

    if "train-throughput" in sections:
        def training() -> None:
            before = common.matmul_peak(device, args.quick)
            rows = train_throughput.run(args.quick, before)
            after = common.matmul_peak(device, args.quick)
            # The better of the two peaks: the machine's rate when least disturbed, so MFU is
            # not flattered by a peak taken while something else was running.
            peak = max(before, after, key=lambda p: p["flops"])
            for row in rows:
                row["peak_flops"] = peak["flops"]
                row["mfu"] = row["achieved_flops"] / peak["flops"]
                if "usual_mfu" in row:
                    row["usual_mfu"] = row["usual_images_per_s"] * row["flops_per_image"] / peak["flops"]
            results["device_peak"] = {**peak, "before": before["flops"], "after": after["flops"]}
            results["train_throughput"] = rows
            results["ours_vs_usual"] = train_throughput.comparison(rows)
            train_throughput.print_table(rows, peak)

        section("train-throughput", training)
    if "cost-growth" in sections:
        def growth() -> None:
            results["cost_growth"] = cost_growth.run(args.quick)
            cost_growth.print_table(results["cost_growth"])

        section("cost-growth", growth)
    if "attention-distance" in sections:
        def attention() -> None:
            results["attention_distance"] = attention_distance.run(args.quick)
            attention_distance.print_table(results["attention_distance"])

        section("attention-distance", attention)
    if "probe-throughput" in sections:
        def probes() -> None:
            results["probe_throughput"] = probe_throughput.run(args.quick)
            probe_throughput.print_table(results["probe_throughput"])

        section("probe-throughput", probes)
    if "kernel-threads" in sections:
        def threads() -> None:
            from localitylab.attention import fused

            if not fused.load():
                print("the fused kernel did not build here: skipped")
                return
            results["kernel_threads"] = kernel_threads.run(args.quick)
            kernel_threads.print_table(results["kernel_threads"])

        section("kernel-threads", threads)
    if "probe-costs" in sections and not args.quick:
        def costs() -> None:
            results["probe_costs"] = probe_costs.run()
            probe_costs.print_table(results["probe_costs"])

        section("probe-costs", costs)
    if "whole-process" in sections and not args.quick:
        def whole() -> None:
            results["whole_process"] = whole_process.run(epochs=15, rounds=3, threads=args.threads)

        section("whole-process", whole)

    print("\nsection seconds (wall / CPU, this process and its children): "
          + ", ".join(f"{k} {v:.1f} / {results['cpu_seconds'][k]:.1f}" for k, v in results["seconds"].items()))
    write_json(args.json, results)
    print(f"wrote {args.json}")
    from localitylab.models.registry import model_kind

    rows = results.get("train_throughput", [])
    bad = [row["model"] for row in rows if not (math.isfinite(row["mfu"]) and row["mfu"] > 0)
           or (row["mfu"] > 1 and model_kind(row["model"]) != "convnet")]
    if bad:
        print(f"warning: MFU outside (0, 1] for {', '.join(bad)}", file=sys.stderr)
    above = [row["model"] for row in rows if row["mfu"] > 1 and row["model"] not in bad]
    if above:
        # FLOPs are a direct convolution's; a library may compute it with fewer multiplications.
        print(f"note: MFU above 1 for {', '.join(above)}: its convolutions beat the matmul peak with fewer "
              "multiplications than a direct convolution's FLOPs (benchmarks/RESULTS.md)")
    return 0


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    sys.exit(main())

"""Training as a whole process: `localitylab train` against the usual way's script.

Each run is its own process, timed from start to exit (interpreter start, imports, data,
model, every epoch with its test evaluation, the files written):

  ours:   python -m cli train MODEL DATA --epochs E --quiet --out TMP
  usual:  python -m benchmarks.usual_way MODEL --dataset DATA --epochs E --out TMP
          (DataLoader with one worker per core, per-image torchvision v2 transforms, torch
          AdamW, the same recipe, batch size and epochs; `usual_way.py`)

They run in interleaved rounds (ours, usual, ours, usual, ...) so both see the same machine;
the figure is each side's median wall seconds and the ratio usual/ours. The CPU seconds of
each process tree (user + system, its DataLoader workers included) and the load average
around each model are recorded beside them, and both sides' final test accuracy, to show
that both did the same work. `--threads N` sets OMP_NUM_THREADS for both processes.

    python -m benchmarks.whole_process [--models pit-n,vit-n/2,resnet-n] [--epochs 100] [--rounds 3]
                                       [--threads N] [--baseline CHECKOUT] [--quick] [--json PATH]

--baseline CHECKOUT adds that checkout's `localitylab train` to every round (ours, baseline,
usual), for a before/after comparison in one run.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NANO_MODELS = ("pit-n", "vit-n/2", "resnet-n")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _env(root: Path, threads: int | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _timed(command: list[str], env: dict[str, str], root: Path = ROOT) -> tuple[float, float, str]:
    """Wall and CPU seconds of one process (and its children), and its standard output."""
    cpu, started = _children_cpu(), time.perf_counter()
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - started, _children_cpu() - cpu
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall, cpu, done.stdout


def ours(model: str, dataset: str, epochs: int, out: Path, env: dict[str, str], root: Path = ROOT) -> dict:
    """`localitylab train` of the checkout at `root`."""
    wall, cpu, _ = _timed([sys.executable, "-m", "cli", "train", model, dataset, "--epochs", str(epochs), "--quiet",
                           "--out", str(out)], env, root)
    with open(out / "metrics.csv", newline="") as f:
        last = list(csv.DictReader(f))[-1]
    return {"wall_s": wall, "cpu_s": cpu, "test_acc": float(last["test_acc"])}


def usual(model: str, dataset: str, epochs: int, out: Path, env: dict[str, str]) -> dict:
    wall, cpu, stdout = _timed([sys.executable, "-m", "benchmarks.usual_way", model, "--dataset", dataset,
                                "--epochs", str(epochs), "--out", str(out)], env)
    result = json.loads(stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "cpu_s": cpu, "test_acc": float(result["test_acc"]), "workers": result["workers"],
            "batch_size": result["batch_size"]}


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def measure(model: str, dataset: str, epochs: int, rounds: int, threads: int | None,
            baseline: Path | None = None) -> dict:
    """Interleaved rounds: ours, [the baseline checkout's `localitylab train`,] the usual way."""
    env = _env(ROOT, threads)
    load_before = os.getloadavg()
    runs = {"ours": [], "baseline": [], "usual": []}
    with tempfile.TemporaryDirectory(prefix="whole-process-") as tmp:
        for r in range(rounds):
            runs["ours"].append(ours(model, dataset, epochs, Path(tmp) / f"ours-{r}", env))
            if baseline is not None:
                runs["baseline"].append(ours(model, dataset, epochs, Path(tmp) / f"baseline-{r}",
                                             _env(baseline, threads), baseline))
            runs["usual"].append(usual(model, dataset, epochs, Path(tmp) / f"usual-{r}", env))
    row = {"model": model, "data": dataset, "epochs": epochs, "rounds": rounds, "threads": threads,
           "batch_size": runs["usual"][0]["batch_size"], "usual_workers": runs["usual"][0]["workers"],
           "load_before": list(load_before), "load_after": list(os.getloadavg()),
           **{f"{side}_runs": done for side, done in runs.items() if done}}
    for side, done in runs.items():
        if not done:
            continue
        row[f"{side}_s"] = median([r["wall_s"] for r in done])
        row[f"{side}_cpu_s"] = median([r["cpu_s"] for r in done])
        row[f"{side}_test_acc"] = median([r["test_acc"] for r in done])
    row["ratio"] = row["usual_s"] / row["ours_s"]
    row["cpu_ratio"] = row["usual_cpu_s"] / row["ours_cpu_s"]
    if baseline is not None:
        row["baseline"] = str(baseline)
        row["baseline_ratio"] = row["usual_s"] / row["baseline_s"]
    return row


def run(quick: bool = False, models: tuple[str, ...] = NANO_MODELS, dataset: str = "digits",
        epochs: int | None = None, rounds: int | None = None, threads: int | None = None,
        baseline: Path | None = None) -> list[dict]:
    """One row per model. --quick: one round of one epoch (a smoke test, not figures to quote)."""
    epochs = epochs or (1 if quick else 100)
    rounds = rounds or (1 if quick else 3)
    rows = []
    for model in models:
        rows.append(measure(model, dataset, epochs, rounds, threads, baseline))
        print_table(rows[-1:], header=len(rows) == 1)
    return rows


def print_table(rows: list[dict], header: bool = True) -> None:
    if header:
        print(f"{'model':<9} {'data':<7} {'epochs':>6} {'batch':>5} {'rounds':>6} {'ours s':>8} {'usual s':>8} "
              f"{'usual/ours':>10} {'CPU ratio':>9} {'ours acc':>8} {'usual acc':>9}  load before/after")
    for row in rows:
        print(f"{row['model']:<9} {row['data']:<7} {row['epochs']:>6} {row['batch_size']:>5} {row['rounds']:>6} "
              f"{row['ours_s']:>8.1f} {row['usual_s']:>8.1f} {row['ratio']:>10.2f} {row['cpu_ratio']:>9.2f} "
              f"{row['ours_test_acc']:>8.4f} {row['usual_test_acc']:>9.4f}  "
              f"{row['load_before'][0]:.2f}/{row['load_after'][0]:.2f}", flush=True)
        if "baseline_s" in row:
            print(f"{'':<9} baseline {row['baseline']}: {row['baseline_s']:.1f} s, usual/baseline "
                  f"{row['baseline_ratio']:.2f}, test acc {row['baseline_test_acc']:.4f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.whole_process", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(NANO_MODELS))
    parser.add_argument("--data", default="digits")
    parser.add_argument("--epochs", type=int, help="default: 100 (the default of `localitylab train`); 1 with --quick")
    parser.add_argument("--rounds", type=int, help="default: 3; 1 with --quick")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of both processes (default: torch's choice)")
    parser.add_argument("--baseline", type=Path, help="another checkout whose `localitylab train` runs in the same "
                        "rounds (before/after a change)")
    parser.add_argument("--quick", action="store_true", help="one round of one epoch: a smoke test")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args(argv)
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}  {os.cpu_count()} CPUs, load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}; threads {args.threads or 'default'}", flush=True)
    rows = run(args.quick, tuple(args.models.split(",")), args.data, args.epochs, args.rounds, args.threads,
               args.baseline.resolve() if args.baseline else None)
    if args.json:
        from localitylab.io import write_json

        write_json(args.json, {"command": "python -m benchmarks.whole_process " + " ".join(
            argv if argv is not None else sys.argv[1:]), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "cpu_count": os.cpu_count(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evidence for the training defaults of pit-*/vit-* (docs/defaults.md): a small grid of real runs.

Every cell is trained and probed through the command line a user would type
(`python -m cli train ...`, then `python -m cli probe pe-similarity RUN` and
`... attention-distance RUN`), so the table is what a user of the toolkit would get. Runs
that are already complete in --root (ckpt.pt with all epochs done, both probe tables) are
reused, so the script can be stopped and restarted.

    python scripts/defaults_evidence.py                     # train what is missing, print the table
    python scripts/defaults_evidence.py --table             # only print the table of what exists
    python scripts/defaults_evidence.py --only shapes-16    # cells whose name contains this
    python scripts/defaults_evidence.py --jobs 2            # two runs at a time (default 1)

Per run: test accuracy (last epoch) with its 95% Wilson interval over the test images, and
at 3/4 of training (has it levelled off?); `pe_distance_spearman`, `pe_topology_r2` and `pe_linear_r2` of the
learned table (pe-similarity); how far training moved the table, |P - P0| / |P0|, and the
Spearman of the part it added, P - P0 (P0 rebuilt from the run's seed and spec as training
builds it); the head-mean `locality_ratio` of every block and the most local block with its
95% interval (attention-distance, 128 test images). Per cell: the mean over seeds and the
range [min..max]. The untrained rows are the same model built with seeds 0..2 and never
trained: the null a learned table must leave.

Every cell runs seed 0 first; seed 1 follows where `seeds` names it. On 2 CPU cores shared
with other work (OMP_NUM_THREADS=1, two runs at a time) the runs in docs/defaults.md took
about 70 minutes (the driver prints each run's seconds). The grid as committed also has seed-1
runs that docs/defaults.md did not wait for; the table shows how many seeds each cell has.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cli"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
       "OMP_WAIT_POLICY": "PASSIVE"}

DIGITS_RECIPE = ["--batch-size", "32", "--warmup-epochs", "1"]  # studies/demo.toml's recipe


@dataclass(frozen=True)
class Cell:
    """One setting: a model on a data set with a recipe, a position-embedding init, some seeds."""

    model: str
    dataset: str
    epochs: int
    std: float | None  # None: the code's default (no --model-kw)
    seeds: tuple[int, ...] = (0, 1)
    recipe: tuple[str, ...] = ()
    tag: str = ""  # names a recipe variant

    @property
    def name(self) -> str:
        std = "default" if self.std is None else f"{self.std:g}"
        return f"{self.model.replace('/', '-')}_{self.dataset}_e{self.epochs}_std{std}{('_' + self.tag) if self.tag else ''}"

    def train_args(self) -> list[str]:
        args = [self.model, self.dataset, "--epochs", str(self.epochs), "--quiet", *self.recipe]
        if self.std is not None:
            args += ["--model-kw", f"pos_embed_std={self.std:g}"]
        return args


STDS = (1.0, 0.02, 0.1)  # the old default, timm's, one between
GRID: list[Cell] = [
    # generated shapes at 16 px with the command line's default recipe (batch 128, lr 1e-3,
    # 5 warm-up epochs, cosine): vit-n/2, 64 tokens
    *[Cell("vit-n/2", "shapes-16", 20, std) for std in STDS],
    # digits 8x8 with the demo's recipe: pit-n (64 tokens); and at 3x the learning rate
    *[Cell("pit-n", "digits", 15, std, recipe=tuple(DIGITS_RECIPE)) for std in STDS],
    Cell("pit-n", "digits", 15, 0.02, seeds=(0,), recipe=(*DIGITS_RECIPE, "--lr", "3e-3"), tag="lr3e-3"),
    # shapes at 32 px, default recipe: vit-n/4, 64 tokens
    *[Cell("vit-n/4", "shapes-32", 20, std) for std in STDS[:2]],
    # digits with vit-n/2 (16 tokens), the demo's other transformer
    *[Cell("vit-n/2", "digits", 15, std, recipe=tuple(DIGITS_RECIPE)) for std in STDS],
    # pit-n on colour images: shapes at 8 px (64 tokens of 3 values), the digits recipe
    *[Cell("pit-n", "shapes-8", 15, std, seeds=(0,), recipe=tuple(DIGITS_RECIPE)) for std in STDS[:2]],
]
# Run only when named with --only.
EXTRA: list[Cell] = [
    # the witness: long enough for the table to learn the grid (docs/defaults.md)
    Cell("vit-n/2", "shapes-16", 60, 0.02, seeds=(0,)),
    # pit-n at 16 px: 256 tokens, one seed
    *[Cell("pit-n", "shapes-16", 8, std, seeds=(0,)) for std in STDS],
    # the non-local task at 16 px
    *[Cell("vit-n/2", "nonlocal-16", 20, std, seeds=(0,)) for std in STDS],
]
UNTRAINED = [("vit-n/2", "shapes-16"), ("vit-n/4", "shapes-32"), ("pit-n", "digits")]
UNTRAINED_SEEDS = range(3)


def run_dir(root: Path, cell: Cell, seed: int) -> Path:
    return root / cell.name / f"seed{seed}"


PROBES = ("pe-similarity", "attention-distance")


def trained(folder: Path, epochs: int) -> bool:
    try:
        return json.loads((folder / "run.json").read_text())["epochs_done"] >= epochs
    except (OSError, ValueError, KeyError):
        return False


def call(args: list[str], log: Path, lock: Path | None = None) -> None:
    """Run one command line, its output appended to `log`; `lock` holds its process id meanwhile."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write("$ " + " ".join(args[1:]) + "\n")
        out.flush()
        process = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        if lock:
            lock.write_text(str(process.pid))
        returncode = process.wait()
    if lock:
        lock.unlink(missing_ok=True)
    if returncode:
        raise RuntimeError(f"failed ({returncode}): {' '.join(args[1:])}; see {log}")


def wait_for_other_driver(lock: Path) -> None:
    """A driver stopped and restarted leaves its training processes running: wait for them."""
    while lock.exists():
        try:
            os.kill(int(lock.read_text()), 0)
        except (ValueError, ProcessLookupError):
            lock.unlink(missing_ok=True)
            return
        time.sleep(20)


def train_and_probe(root: Path, cell: Cell, seed: int) -> str:
    folder = run_dir(root, cell, seed)
    start = time.time()
    log = folder.parent / f"seed{seed}.log"
    lock = folder.parent / f"seed{seed}.training"
    wait_for_other_driver(lock)
    if not trained(folder, cell.epochs):  # a run stopped part-way starts again from scratch
        call([*CLI, "train", *cell.train_args(), "--seed", str(seed), "--out", str(folder)], log, lock)
    for probe in PROBES:
        if not (folder / "probes" / f"{probe}.csv").exists():
            call([*CLI, "probe", probe, str(folder)], log)
    return f"{folder}: {time.time() - start:.0f} s"


def probe_untrained(root: Path, model: str, dataset: str, seed: int) -> str:
    folder = root / "untrained" / f"{model.replace('/', '-')}_{dataset}" / f"seed{seed}"
    if (folder / "pe-similarity.csv").exists():
        return f"{folder}: done before"
    call([*CLI, "probe", "pe-similarity", model, "--data", dataset, "--seed", str(seed), "--out", str(folder)],
         folder.parent / f"seed{seed}.log")
    return f"{folder}: probed"


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def run_numbers(folder: Path) -> dict[str, object] | None:
    """Accuracy (+ Wilson interval), PE metrics and head-mean locality ratio per block of one run."""
    from scipy.stats import binomtest

    if not (folder / "probes" / "attention-distance.csv").exists():
        return None
    history = rows(folder / "metrics.csv")
    n_test = test_count(folder)
    accuracy = float(history[-1]["test_acc"])
    interval = binomtest(round(accuracy * n_test), n_test).proportion_ci(method="wilson")
    pe = {r["metric"]: float(r["value"]) for r in rows(folder / "probes" / "pe-similarity.csv") if r["value"]}
    per_block = [r for r in rows(folder / "probes" / "attention-distance.csv")
                 if r["metric"] == "locality_ratio" and r["head"] == "" and r["value"]]
    ratios = [float(r["value"]) for r in per_block]
    most_local = min(per_block, key=lambda r: float(r["value"]))
    local_ci = f"{float(most_local['value']):.3f} [{float(most_local['ci_low']):.3f}, {float(most_local['ci_high']):.3f}]"
    moved, delta_rho = learned_part(folder)
    return dict(local_ci=local_ci, moved=moved, delta_rho=delta_rho, acc=accuracy, acc_lo=interval.low, acc_hi=interval.high, n_test=n_test,
                best=max(float(h["test_acc"]) for h in history),
                acc_3q=float(history[(3 * len(history)) // 4 - 1]["test_acc"]),
                spearman=pe.get("pe_distance_spearman"), topo=pe.get("pe_topology_r2"), linear=pe.get("pe_linear_r2"), ratios=ratios)


def learned_part(folder: Path) -> tuple[float, float]:
    """(|P - P0| / |P0|, Spearman of P - P0 against distance): how far training moved the table
    from the one the run started with (rebuilt from the run's seed and spec, as training
    builds it), and whether the part it added encodes the grid."""
    sys.path.insert(0, str(ROOT))
    import localitylab
    from localitylab.attention import TokenGeometry
    from localitylab.models.registry import ModelSpec
    from localitylab.probes.pe_moved import initial_model, relative_change
    from localitylab.probes.pe_similarity import distance_spearman

    run = json.loads((folder / "run.json").read_text())
    start = initial_model(ModelSpec.from_dict(run["model_spec"]), run["config"]["seed"])
    model = localitylab.load(folder / "ckpt.pt")
    prefix = model.num_prefix_tokens
    first, last = start.pos_embed.detach()[0, prefix:], model.pos_embed.detach()[0, prefix:]
    patch = run["model_info"]["patch_size"]
    side = run["model_spec"]["img_size"] // patch
    rho, _ = distance_spearman(last - first, TokenGeometry((side, side), patch, prefix), seed=0)
    return relative_change(last, first), rho


_TEST_COUNTS: dict[str, int] = {}


def test_count(folder: Path) -> int:
    """The test split's size, read from the data set the run names (not stored in run.json)."""
    name = json.loads((folder / "run.json").read_text())["data"]
    if name not in _TEST_COUNTS:
        sys.path.insert(0, str(ROOT))
        from localitylab.data import load_dataset

        _TEST_COUNTS[name] = len(load_dataset(name).test_labels)
    return _TEST_COUNTS[name]


def spread(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{min(values):.{digits}f}..{max(values):.{digits}f}]"


def table(root: Path, cells: list[Cell]) -> str:
    lines = ["| cell | init std | seeds | test acc (mean [min..max]) | 95% Wilson (per seed) | acc @3/4 of training | "
             "PE Spearman | PE topology R2 | PE linear R2 | \\|P-P0\\|/\\|P0\\| | Spearman of P-P0 | "
             "locality ratio per block (head mean, mean over seeds) | most local block [95% CI] (per seed) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cell in cells:
        found = [n for n in (run_numbers(run_dir(root, cell, s)) for s in cell.seeds) if n]
        if not found:
            continue
        blocks = len(found[0]["ratios"])
        ratios = " ".join(f"{sum(n['ratios'][b] for n in found) / len(found):.3f}" for b in range(blocks))
        wilson = "; ".join(f"{n['acc_lo']:.3f}-{n['acc_hi']:.3f}" for n in found)
        recipe = f"{cell.model} {cell.dataset} {cell.epochs} ep{(' ' + ' '.join(cell.recipe)) if cell.recipe else ''}"
        lines.append(f"| {recipe} | {'default' if cell.std is None else f'{cell.std:g}'} | {len(found)} | "
                     f"{spread([n['acc'] for n in found])} | {wilson} (n={found[0]['n_test']}) | "
                     f"{spread([n['acc_3q'] for n in found])} | "
                     f"{spread([n['spearman'] for n in found])} | {spread([n['topo'] for n in found])} | "
                     f"{spread([n['linear'] for n in found])} | "
                     f"{spread([n['moved'] for n in found], 2)} | {spread([n['delta_rho'] for n in found])} | {ratios} | "
                     f"{'; '.join(n['local_ci'] for n in found)} |")
    untrained = []
    for model, dataset in UNTRAINED:
        folder = root / "untrained" / f"{model.replace('/', '-')}_{dataset}"
        values: dict[str, list[float]] = {"pe_distance_spearman": [], "pe_topology_r2": [], "pe_linear_r2": []}
        for seed in UNTRAINED_SEEDS:
            path = folder / f"seed{seed}" / "pe-similarity.csv"
            if path.exists():
                for r in rows(path):
                    if r["metric"] in values and r["value"]:
                        values[r["metric"]].append(float(r["value"]))
        if values["pe_distance_spearman"]:
            untrained.append(f"| {model} {dataset}, untrained | any | {len(values['pe_distance_spearman'])} | | | | "
                             f"{spread(values['pe_distance_spearman'])} | {spread(values['pe_topology_r2'])} | {spread(values['pe_linear_r2'])} | 0 | | | |")
    return "\n".join(lines + untrained)


def run_job(job: tuple) -> str:
    """One job; a failure is reported and the others go on."""
    function, job_args = job
    try:
        return function(*job_args)
    except RuntimeError as err:
        return f"FAILED {err}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "defaults")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--only", default="", help="cells whose name contains this (also the EXTRA cells)")
    parser.add_argument("--table", action="store_true", help="print the table of what exists, train nothing")
    args = parser.parse_args()
    cells = [c for c in GRID + EXTRA if (args.only in c.name if args.only else c in GRID)]
    if not args.table:
        # Every cell's first seed before any cell's second: a grid stopped early still covers every cell.
        jobs = [(train_and_probe, (args.root, c, 0)) for c in cells if 0 in c.seeds]
        if not args.only:
            jobs += [(probe_untrained, (args.root, m, d, s)) for m, d in UNTRAINED for s in UNTRAINED_SEEDS]
        jobs += [(train_and_probe, (args.root, c, s)) for c in cells for s in c.seeds if s]
        with ThreadPoolExecutor(args.jobs) as pool:
            for message in pool.map(run_job, jobs):
                print(message, flush=True)
    print(table(args.root, [c for c in GRID + EXTRA if args.only in c.name]))


if __name__ == "__main__":
    main()

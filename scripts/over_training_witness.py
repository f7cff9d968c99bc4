"""The witness of docs/over-training.md: a CPU-sized setting where locality emerges over training.

vit-n/2 on shapes-16 (localitylab's generated colour shapes, 16 px, 64 tokens), the command
line's default recipe, 20 epochs, position table started at 0.02, snapshots at epochs
0,1,2,4,7,10,15,20, seeds 0..2; each snapshot probed (attention-distance, pe-similarity) on
the same test images; the curves with 95% intervals over seeds, and the report's reading.

    python scripts/over_training_witness.py --root runs/witness --train   # train (about 20 min, 3 at a time)
    python scripts/over_training_witness.py --root runs/witness           # probe what is missing, print

Runs are trained and probed through the command line a user would type; probing is resumable
(a snapshot already probed is read back).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
MODEL, DATA, EPOCHS, SNAPSHOTS = "vit-n/2", "shapes-16", 20, "0,1,2,4,7,10,15,20"


def train_commands(root: Path, seeds: list[int]) -> list[list[str]]:
    return [[sys.executable, "-m", "cli", "train", MODEL, DATA, "--epochs", str(EPOCHS), "--quiet", "--model-kw",
             "pos_embed_std=0.02", "--seed", str(seed), "--snapshots", SNAPSHOTS, "--out",
             str(root / f"vit-n-2_s{seed}")] for seed in seeds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("runs/witness"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--train", action="store_true", help="train the runs first (all seeds at once)")
    args = parser.parse_args()
    if args.train:
        jobs = [subprocess.Popen(command, env=ENV) for command in train_commands(args.root, args.seeds)]
        if any(job.wait() for job in jobs):
            sys.exit("a training run failed")
    runs = [args.root / f"vit-n-2_s{seed}" for seed in args.seeds]
    for run in runs:
        for probe in ("attention-distance", "pe-similarity"):
            subprocess.run([sys.executable, "-m", "cli", "probe", probe, str(run), "--images", str(args.images),
                            "--over-training"], env=ENV, check=True, stdout=subprocess.DEVNULL)
    sys.path.insert(0, str(ROOT))
    from localitylab.report.collect import collect_run
    from localitylab.report.over_training import curve, over_training_section
    from localitylab.report.summary import group_by_seed

    records = [collect_run(run) for run in runs]
    print(f"{MODEL} on {DATA}, seeds {args.seeds}, {args.images} test images; mean over seeds [95% interval]")
    for probe, metric in (("attention-distance", "locality_ratio"), ("pe-similarity", "pe_distance_spearman"),
                          ("pe-similarity", "pe_moved")):
        for layer, points in curve(records, probe, metric).items():
            cells = "  ".join(f"e{epoch:g}: {e.value:.3f} [{e.low:.3f}, {e.high:.3f}]" if e.has_interval
                              else f"e{epoch:g}: {e.value:.3f}" for epoch, e in points)
            print(f"{metric}{'' if layer is None else f' block {layer}'}: {cells}")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for line in over_training_section(group_by_seed(records), Path(tmp)).readings:
            print("-", line)


if __name__ == "__main__":
    main()

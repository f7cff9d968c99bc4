"""The witness of docs/over-training.md: does locality emerge over training, at CPU size?

vit-n/2, pit-n and resnet-n on shapes-16 (localitylab's generated colour shapes, 16 px:
64 tokens for vit-n/2, 256 for pit-n), the command line's default recipe, 60 epochs,
learned position tables started at timm's 0.02, snapshots at epochs 0,2,5,10,20,30,45,60,
seeds 0..2; each snapshot probed on the same test images (attention-distance and
pe-similarity for the transformers, receptive-field for all); the curves with 95%
intervals over seeds, and the report's reading.

    python scripts/over_training_witness.py --root runs/witness --train            # vit-n/2, 3 seeds
    python scripts/over_training_witness.py --root runs/witness --model resnet-n --train
    python scripts/over_training_witness.py --root runs/witness                    # probe what is missing, print

Runs are trained and probed through the command line a user would type, all seeds at once
on one thread each; probing is resumable (a snapshot already probed is read back).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
DATA, EPOCHS, SNAPSHOTS = "shapes-16", 60, "0,2,5,10,20,30,45,60"
ATTENTION_PROBES = ("attention-distance", "pe-similarity", "receptive-field")
CONVNET_PROBES = ("receptive-field",)


def run_dir(root: Path, model: str, seed: int) -> Path:
    return root / f"{model.replace('/', '-')}_s{seed}"


def train_command(root: Path, model: str, seed: int) -> list[str]:
    table = [] if model.startswith("resnet") else ["--model-kw", "pos_embed_std=0.02"]
    return [sys.executable, "-m", "cli", "train", model, DATA, "--epochs", str(EPOCHS), "--quiet", *table,
            "--seed", str(seed), "--snapshots", SNAPSHOTS, "--out", str(run_dir(root, model, seed))]


def print_curves(records: list, probes: tuple[str, ...], label: str) -> None:
    from localitylab.report.over_training import accuracy_curve, curve, over_training_section
    from localitylab.report.summary import group_by_seed

    def cells(points) -> str:
        return "  ".join(f"e{epoch:g}: {e.value:.3f} [{e.low:.3f}, {e.high:.3f}]" if e.has_interval
                         else f"e{epoch:g}: {e.value:.3f}" for epoch, e in points)

    print(label)
    print(f"test_acc: {cells(accuracy_curve(records))}")
    metrics = {"attention-distance": ("locality_ratio",), "pe-similarity": ("pe_distance_spearman", "pe_linear_r2", "pe_topology_r2", "pe_moved"),
               "receptive-field": ("erf_r50_px",)}
    for probe in probes:
        for metric in metrics[probe]:
            for layer, points in curve(records, probe, metric).items():
                print(f"{metric}{'' if layer is None else f' block {layer}'}: {cells(points)}")
    with tempfile.TemporaryDirectory() as tmp:
        for line in over_training_section(group_by_seed(records), Path(tmp)).readings:
            print("-", line)


def flattened_table_check(runs: list[Path], n_images: int) -> None:
    """Is the learned locality carried by the position table? Each final model's locality ratio
    per block as trained, and with its grid rows of the table replaced by their mean (position
    removed, the table's average kept), on the same first test images."""
    import torch

    import localitylab
    from localitylab.data import load_dataset

    images = load_dataset(DATA).test_images[:n_images]
    print(f"locality ratio per block, final model, first {n_images} test images: as trained / table flattened")
    for run in runs:
        cells = []
        for flatten in (False, True):
            model = localitylab.load(run)
            if flatten:
                with torch.no_grad():
                    grid = model.pos_embed[:, model.pos_embed.shape[1] - model.patch_embed.num_patches:]
                    grid.copy_(grid.mean(1, keepdim=True).expand_as(grid))
            table = localitylab.probe("attention-distance", model, images, progress=False, n_images=n_images)
            rows = table[(table.metric == "locality_ratio") & table["head"].isna()].sort_values("layer")
            cells.append(" ".join(f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in zip(rows.value, rows.ci_low,
                                                                                       rows.ci_high)))
        print(f"{run.name}: {cells[0]}\n{'':{len(run.name)}}  {cells[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("runs/witness"))
    parser.add_argument("--model", default="vit-n/2")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--train", action="store_true", help="train the runs first (all seeds at once)")
    args = parser.parse_args()
    if args.train:
        jobs = [subprocess.Popen(train_command(args.root, args.model, seed), env=ENV) for seed in args.seeds]
        if any(job.wait() for job in jobs):
            sys.exit("a training run failed")
    probes = CONVNET_PROBES if args.model.startswith("resnet") else ATTENTION_PROBES
    runs = [run_dir(args.root, args.model, seed) for seed in args.seeds]
    for run in runs:
        for probe in probes:
            subprocess.run([sys.executable, "-m", "cli", "probe", probe, str(run), "--images", str(args.images),
                            "--over-training", "--quiet"], env=ENV, check=True, stdout=subprocess.DEVNULL)
    sys.path.insert(0, str(ROOT))
    from localitylab.report.collect import collect_run

    print_curves([collect_run(run) for run in runs], probes,
                 f"{args.model} on {DATA}, seeds {args.seeds}, {args.images} test images; mean over seeds [95% interval]")
    if probes == ATTENTION_PROBES:
        flattened_table_check(runs, args.images)


if __name__ == "__main__":
    main()

"""What the `study` and `demo` commands print. The library plans and runs; this shell prints."""

from __future__ import annotations

import sys
from pathlib import Path


def run_study_command(file: Path, out: Path | None, scale: str | None, jobs: int, resume: bool,
                      report_dir: Path | None) -> int:
    from localitylab.studies import load_study, run_study, study_folder

    study = load_study(file, scale)
    folder = study_folder(study, out, resume)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result = run_study(study, folder, jobs=jobs, log=log, report_dir=report_dir)
    for kind, path in result.report.items():
        print(f"{kind}: {path}")
    if result.failed:
        print(f"{len(result.failed)} piece(s) failed: {', '.join(result.failed)}; re-run with --resume to retry them",
              file=sys.stderr)
        return 1
    return 0


def show_study(file: Path, scale: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    from localitylab.studies import describe_plan, load_study

    study = load_study(file, scale)
    plan = describe_plan(study)
    console = Console()
    console.print(f"[bold]{plan['title']}[/bold]  ({study.path}, data set {plan['dataset']}"
                  + (f", scale {plan['scale']}" if plan["scale"] else "") + ")")
    if study.description:
        console.print(study.description)
    table = Table()
    for column in ("run", "model", "seed", "permuted", "epochs", "GFLOPs/image", "train PFLOPs", "done"):
        table.add_column(column)
    for row in plan["runs"]:
        table.add_row(row["run"], row["model"], str(row["seed"]), ("-" if row["permute_pixels"] is None
                      else f"{row['pixel_permutation']}, seed {row['permute_pixels']}"),
                      str(row["epochs"]), f"{row['gflops_per_image']:.3g}", f"{row['train_pflops']:.3g}", "yes" if row["done"] else "")
    if plan["runs"]:
        console.print(table)
    for row in plan["pretrained"]:
        console.print(f"{row['run']}: {row['model']} with timm's pretrained weights, probed only"
                      + (" (done)" if row["done"] else ""))
    probes = ", ".join(plan["probes"])
    images = plan["probe_images"] or "each probe's default number of"
    console.print(f"probes: {probes} on {images} test images per run; then one report")
    hours = plan["estimated_hours"]
    console.print(f"training: {plan['total_train_pflops']:.3g} PFLOPs; about {hours:.3g} h on this {plan['device']} "
                  f"(measured matmul {plan['device_matmul_gflops']:.0f} GFLOP/s, assuming 30% of it is reached)")
    if plan["gpu_hours"]:
        console.print(f"documented full-scale cost: about {plan['gpu_hours']} GPU-hours")
    if plan["scales"]:
        console.print(f"smaller variants: {', '.join('--scale ' + s for s in plan['scales'])}")

"""What the `study` and `demo` commands print. The library plans and runs; this shell prints."""

from __future__ import annotations

import sys
from pathlib import Path


def run_study_command(file: Path, out: Path | None, scale: str | None, jobs: int, resume: bool,
                      report_dir: Path | None, executor: str | None = None, slurm: dict | None = None,
                      detach: bool = False, quiet: bool = False) -> int:
    from localitylab.studies import load_study, run_study, study_folder
    from localitylab.studies.spec import slurm_settings

    study = load_study(file, scale)
    folder = study_folder(study, out, resume)
    if executor is None:  # a folder once submitted to SLURM stays there
        executor = "slurm" if (folder / "slurm" / "jobs.json").is_file() else "local"
    settings = slurm_settings(study.slurm, slurm) if executor == "slurm" else None

    def log(line: str) -> None:
        if not quiet or "FAILED" in line:
            print(line, file=sys.stderr, flush=True)

    try:
        if not detach and not quiet:
            result = _run_with_progress(study, folder, jobs, report_dir, executor, settings)
        else:
            result = run_study(study, folder, jobs=jobs, log=log, report_dir=report_dir, executor=executor,
                               slurm=settings, detach=detach)
    except KeyboardInterrupt:
        if executor != "slurm":
            raise
        return _interrupted(file, folder)
    if detach:
        print(f"submitted; see `localitylab study status {folder}`, then collect and report with "
              f"`localitylab study run {file} --out {folder} --resume`")
        return 0
    for kind, path in result.report.items():
        print(f"{kind}: {path}")
    if result.failed:
        print(f"{len(result.failed)} piece(s) failed: {', '.join(result.failed)}; re-run with --resume to retry them",
              file=sys.stderr)
        return 1
    return 0


def _run_with_progress(study, folder: Path, jobs: int, report_dir: Path | None, executor: str, settings):
    """run_study with a progress bar on stderr (the log lines print above it): the pieces
    running here, or the SLURM jobs' states."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from localitylab.studies import run_study

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("waiting for SLURM" if executor == "slurm" else "starting", total=None)

        def progress(finished: int, total: int, states: dict[str, str]) -> None:
            if executor == "local":
                description = ", ".join(states) or "writing the report"
            else:
                counts = {state: list(states.values()).count(state) for state in sorted(set(states.values()))}
                description = ", ".join(f"{n} {s.lower()}" for s, n in counts.items()) or "collecting"
            bar.update(task, completed=finished, total=total, description=description)

        return run_study(study, folder, jobs=jobs, log=lambda line: bar.console.print(line, markup=False, highlight=False, soft_wrap=True),
                         report_dir=report_dir, executor=executor, slurm=settings, progress=progress)


def _interrupted(file: Path, folder: Path) -> int:
    """Ctrl-C while waiting for SLURM: cancel the study's jobs, or leave them running."""
    from localitylab.studies.slurm import cancel, live_jobs

    jobs = live_jobs(folder)
    if not jobs:
        print("localitylab: interrupted", file=sys.stderr)
        return 130
    answer = "leave"
    if sys.stdin.isatty():
        # rich's prompt asks again until the answer is one of the choices (typer's own prompt
        # changed how it takes choices between releases; rich's has not)
        from rich.console import Console
        from rich.prompt import Prompt

        answer = Prompt.ask(f"\n{len(jobs)} job(s) of this study are still queued or running: cancel them, or "
                            f"leave them running?", choices=["cancel", "leave"], default="leave",
                            console=Console(stderr=True))
    if answer == "cancel":
        cancel(jobs)
        print(f"cancelled {len(jobs)} job(s); `localitylab study run {file} --out {folder} --resume` submits "
              f"them again", file=sys.stderr)
    else:
        print(f"{len(jobs)} job(s) left running; `localitylab study status {folder}` shows them and "
              f"`localitylab study run {file} --out {folder} --resume` collects them", file=sys.stderr)
    return 130


def print_status(folder: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from localitylab.studies.slurm import study_status

    rows = study_status(folder)
    table = Table(title=f"study in {folder}")
    for column in ("piece", "state", "job", "log"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["piece"], row["state"], row["job"], row["log"])
    Console().print(table)
    done = sum(row["state"] == "done" for row in rows)
    print(f"{done} of {len(rows)} pieces done")


def show_study(file: Path, scale: str | None, executor: str | None = None, slurm: dict | None = None) -> None:
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
    if executor == "slurm" or study.slurm:
        _show_submission(study, slurm, console)


def _show_submission(study, given: dict | None, console) -> None:
    """What `study run --executor slurm` would submit: the jobs, their resources and dependencies."""
    from localitylab.studies import make_plan
    from localitylab.studies.pieces import piece_work
    from localitylab.studies.slurm import submission
    from localitylab.studies.spec import slurm_settings

    settings = slurm_settings(study.slurm, given)
    work = piece_work(make_plan(study, "runs/study"))
    alike = [w for w in work if w[0].name.startswith("train ") and not w[4]]
    others = [w for w in work if w not in alike or len(alike) == 1]
    parameters = submission(settings)
    extra = parameters.pop("additional_parameters")
    console.print(f"with SLURM: {len(work)} jobs"
                  + (f" (the {len(alike)} trainings that start from nothing as one job array)" if len(alike) > 1 else ""))
    for piece, _, _, _, after in others:
        console.print(f"  {piece.name}" + (f"  after {', '.join(after)}" if after else ""), markup=False)
    resources = {k: v for k, v in parameters.items() if k not in ("job_name", "stderr_to_stdout")}
    console.print("each job: " + ", ".join(f"{k}={v}" for k, v in {**resources, **extra}.items())
                  + f" (time in minutes); logs in <out>/slurm/logs/", markup=False)

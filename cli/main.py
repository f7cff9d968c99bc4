"""`localitylab`: train, evaluate and list models and data sets.

Kept thin on purpose: each command parses its options, calls one library function and
prints. Library imports happen inside the commands so `localitylab --help` never
imports torch.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import List, Optional

import typer

from cli.errors import run_cli
from cli.options import parse_model_kw, probe_options, slurm_options, training_options

app = typer.Typer(
    name="localitylab",
    help="How much locality did a vision model learn? Train PiTs, ViTs and ConvNets, probe them, report.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors.")) -> None:
    """localitylab: train, probe and report on how local vision models are."""


@app.command()
@training_options("train")
def train(config, nproc: int, quiet: bool, nnodes: int = 1) -> None:
    """Train MODEL on DATASET and write ckpt.pt, metrics.csv and run.json to the run folder.

    Example: localitylab train vit-n/2 digits --epochs 30 --out runs/vit-digits
    """
    _run_training(config, nproc, quiet, nnodes)


pretrain_app = typer.Typer(help="Self-supervised pre-training of a PiT or ViT encoder.", no_args_is_help=True)
app.add_typer(pretrain_app, name="pretrain")


@pretrain_app.command("mae")
@training_options("pretrain mae")
def pretrain_mae(config, nproc: int, quiet: bool) -> None:
    """Masked-autoencoder pre-training (He et al. 2022); the checkpoint's model is the encoder.

    Example: localitylab pretrain mae pit-n digits --epochs 20 && localitylab train pit-n digits
    --init-from runs/mae-pit-n-digits/ckpt.pt
    """
    _run_training(config, nproc, quiet)


def _run_training(config, nproc: int, quiet: bool, nnodes: int = 1) -> None:
    """Train in this process, or start `nproc` ranks through torchrun and let them train
    (on each of `nnodes` nodes of a SLURM allocation, through srun)."""
    from cli.worker import how_to_continue, launch, launch_nodes
    from localitylab.errors import RunStopped, UserError
    from localitylab.train import distributed, train
    from localitylab.train.job import write_job
    from localitylab.train.progress import final_message, make_reporter

    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    if nnodes < 1:
        raise UserError(f"--nnodes must be at least 1, got {nnodes}")
    if nnodes > 1 and not distributed.is_worker():
        distributed.check_batch_divides(config.batch_size, nnodes * nproc)
        job = write_job(config, quiet, folder=config.run_dir().parent)  # every node reads it: beside the runs
        launch_nodes(job, nnodes, nproc)
        job.unlink(missing_ok=True)
        return
    if nproc > 1 and not distributed.is_worker():
        distributed.check_batch_divides(config.batch_size, nproc)
        job = write_job(config, quiet)
        launch(job, nproc)  # on failure the job file stays, for the re-run it names
        job.unlink(missing_ok=True)
        return
    try:
        final = train(config, make_reporter(quiet)).final
    except RunStopped as stopped:
        raise how_to_continue(stopped, config) from None
    if final:
        distributed.print_main(final_message(config.run_dir() / "ckpt.pt", final, config.task))


@app.command("eval")
def evaluate_cmd(
    checkpoint: Path = typer.Argument(..., help="A localitylab ckpt.pt"),
    data: Optional[str] = typer.Option(None, help="Data set (default: the checkpoint's)."),
    data_dir: Optional[Path] = typer.Option(None, help="Where data sets live."),
    img_size: Optional[int] = typer.Option(None, help="Image size for folder: data sets."),
    split: str = typer.Option("test", help="test or train."),
    batch_size: int = typer.Option(512, help="Images per forward pass."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Accuracy and loss of a checkpoint on its data set (its pixel permutation applied).

    Example: localitylab eval runs/vit-digits/ckpt.pt
    """
    from localitylab.train.evaluation import evaluate_checkpoint

    result = evaluate_checkpoint(checkpoint, data=data, data_dir=data_dir, img_size=img_size, split=split,
                                 batch_size=batch_size, device=device)
    print(f"{result['model']} on {result['data']} ({split}, {result['n_images']} images): "
          f"accuracy {result['accuracy']:.4f}  loss {result['loss']:.4f}")


@app.command()
def models(
    data: Optional[str] = typer.Option(None, help="Describe the models on this data set (its image size, "
                                       "channels and classes), e.g. digits."),
    img_size: Optional[int] = typer.Option(None, help="Image size to describe the models at (default 32)."),
    in_chans: Optional[int] = typer.Option(None, help="Input channels (default 3)."),
    num_classes: Optional[int] = typer.Option(None, help="Classes (default 100)."),
) -> None:
    """The model zoo: parameters, tokens per image and patch size at a given image shape.

    Example: localitylab models --data digits
    """
    from localitylab.models.zoo import zoo_rows

    shape = (32, 3, 100)
    if data is not None:
        shape = _data_shape(data)
    img_size, in_chans, num_classes = (given if given is not None else default for given, default in
                                       zip((img_size, in_chans, num_classes), shape))
    where = f" on {data}" if data else ""
    table = _table(f"localitylab models{where} at {img_size}x{img_size}x{in_chans}, {num_classes} classes",
                   ("name", "kind", "params", "patch", "tokens/image", "description"),
                   right=("params", "patch", "tokens/image"))
    for row in zoo_rows(img_size, in_chans, num_classes):
        table.add_row(row["name"], row["kind"], f"{row['params'] / 1e6:.2f}M", row["patch"], row["tokens"], row["summary"])
    _print_table(table)
    print("Any timm model: timm:NAME (with --model-kw key=value and --weights FILE).")


def _data_shape(name: str) -> tuple[int, int, int]:
    """(image size, channels, classes) of a data set: known without loading it, or read from
    the data set where it is here (the bundled digits; a folder: needs its --img-size)."""
    from localitylab.data.registry import known_shape, load_dataset

    shape = known_shape(name)
    if shape is not None:
        return shape.img_size, shape.in_chans, shape.num_classes
    info = load_dataset(name).info
    return info.img_size, info.in_chans, info.num_classes


WIDTH = 80  # listings fit a terminal of 80 columns: long cells wrap, nothing is cut


def _table(title: str, columns, right=()):
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left", overflow="fold")
    return table


def _print_table(table) -> None:
    from rich.console import Console

    console = Console()
    Console(width=min(console.width, WIDTH) if console.is_terminal else WIDTH).print(table)


@app.command()
def datasets(data_dir: Optional[Path] = typer.Option(None, help="Where data sets live.")) -> None:
    """The data sets: what each is, whether it is here, and how to get it.

    Example: localitylab datasets --data-dir ~/data
    """
    from cli.errors import said
    from localitylab.data import DataOptions, dataset_entries
    from localitylab.train.config import TrainConfig

    options, settings = DataOptions(data_dir=data_dir), TrainConfig.model_fields
    table = _table("localitylab data sets", ("name", "what", "here?", "defaults (for what you leave unset)"))
    for entry in dataset_entries():
        table.add_row(entry.pattern, said(entry.summary, settings), said(entry.availability(options), settings),
                      entry.defaults_for(entry.pattern).describe())
    _print_table(table)


def probe(
    name: str = typer.Argument(..., help="A probe name, 'all' (every probe), or 'list' (what each one measures)."),
    source: Optional[str] = typer.Argument(None, help="A ckpt.pt, a run folder, a registry name (untrained) or timm:NAME."),
    data: Optional[str] = typer.Option(None, help="Data set (default: the checkpoint's; digits for others)."),
    data_dir: Optional[Path] = typer.Option(None, help="Where data sets live."),
    img_size: Optional[int] = typer.Option(None, help="Image size for folder: data sets; for a timm: model with "
                                           "--pretrained or --weights, the model's input size (default: its own)."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default <run folder>/probes)."),
    model_kw: Optional[List[str]] = typer.Option(None, "--model-kw", help="key=value for registry/timm: models."),
    weights: Optional[Path] = typer.Option(None, help="Weights for a timm: model (safetensors or state dict), "
                                           "loaded the way timm loads them; the model's own input pipeline."),
    pretrained: bool = typer.Option(False, help="timm:NAME[.TAG]: timm's pretrained weights (Hugging Face hub, its "
                                    "cache, HF_HUB_OFFLINE) and the model's own input pipeline."),
    pos_embed: Optional[str] = typer.Option(None, help="Position embedding of an untrained pit/vit."),
    opt: Optional[List[str]] = typer.Option(None, "--opt", help="A probe option as key=value (repeatable); the same "
                                            "as its own flag."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    settings: dict = None,
) -> None:
    """Run a locality probe and write its table, figures and meta.json.

    Example: localitylab probe attention-distance runs/pit-n-digits/ckpt.pt --images 64
    """
    if name == "list":
        _print_probe_list()
        return
    if source is None:
        from localitylab.errors import UserError

        raise UserError(f"probe {name} needs a model: a ckpt.pt, a run folder, a registry name or timm:NAME")
    from localitylab.probes import ProbeRequest, run_probes
    from localitylab.probes.settings import ProbeSettings

    given = {**parse_model_kw(opt, "--opt"), **(settings or {})}
    common = {key: given.pop(key) for key in list(given) if key in ProbeSettings.model_fields}
    if out is None:
        out = _default_probe_out(source)
    request = ProbeRequest(
        source=source, data=data, data_dir=str(data_dir) if data_dir else None, img_size=img_size, out=out,
        model_kw=parse_model_kw(model_kw), weights=str(weights) if weights else None, pretrained=pretrained,
        pos_embed=pos_embed, options=given, **common)
    from localitylab.progress import make_progress

    for output in run_probes([name], request, make_progress(not quiet)):
        note = ""
        if output.table["note"].ne("").all() and output.table["value"].isna().all():
            reason = output.table["note"].iloc[0]
            note = f" ({reason})" if re.search(r"\bdo(es)? not apply\b", reason) else f" (does not apply: {reason})"
        rows = len(output.table)
        print(f"{output.probe}: {rows} row{'' if rows == 1 else 's'} -> {output.csv}{note}")
        for figure in output.figures:
            print(f"  figure: {figure}")


def probe_command(full: bool = True):
    """`probe` with one option per probe setting (the settings of every registered probe: this
    imports the probes, so it is built only when `probe` runs); `full=False`: the command as
    `localitylab --help` lists it, without the probe settings."""
    fields = []
    if full:
        from localitylab.probes.registry import probe_fields

        fields = probe_fields()
    return probe_options(fields)(probe)


app.command("probe")(probe_command(full=False))


@app.command()
def sample(
    source: str = typer.Argument(..., help="A diffusion run (folder or ckpt.pt, trained with --task diffusion), "
                                 "or dit-*/P (untrained, with --data)."),
    n: int = typer.Option(1000, "--n", help="How many samples (class-balanced: image i has label i mod classes)."),
    guidance: float = typer.Option(1.0, help="Classifier-free guidance scale (1 = the conditional model alone)."),
    steps: int = typer.Option(25, help="Sampler steps."),
    sampler: str = typer.Option("dpm-solver", help="dpm-solver (DPM-Solver++, 2nd order) or ddim."),
    seed: int = typer.Option(0, help="Seed: image i's starting noise comes from (seed, i)."),
    batch_size: int = typer.Option(256, help="Images per sampler pass."),
    data: Optional[str] = typer.Option(None, help="For dit-*/P: the data set that gives its shapes."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default <run folder>/samples)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Sample a diffusion run: samples.npz (uint8 images, labels, how they were drawn) and a
    samples.png grid, one row per class; both written atomically.

    Example: localitylab sample runs/dit-n-p1-digits --n 1000 --guidance 2.0
    """
    from localitylab.generation.runs import SampleRequest, sample_run
    from localitylab.progress import make_progress

    samples, folder = sample_run(SampleRequest(source, n=n, steps=steps, guidance=guidance, sampler=sampler, seed=seed,
                                               batch_size=batch_size, device=device, data=data, out=out),
                                 make_progress(not quiet))
    print(f"{len(samples.images)} samples ({samples.setting}, seed {seed}) -> {folder / 'samples.npz'}")
    print(f"  grid: {folder / 'samples.png'}")


@app.command("evaluate-samples")
def evaluate_samples_cmd(
    samples: Path = typer.Argument(..., help="A sample set: samples.npz, its folder, or a run folder with samples/."),
    classifier: Optional[str] = typer.Option(None, help="A classifier run (folder or ckpt.pt) trained on the same "
                                             "data, e.g. resnet-n: the feature space of fd_/precision_/recall_."),
    against: Optional[str] = typer.Option(None, help="The data set (default: the one the samples' model learned)."),
    data_dir: Optional[Path] = typer.Option(None, help="Where data sets live."),
    inception_weights: Optional[Path] = typer.Option(None, help="Inception-v3 weights file (torch-fidelity's): "
                                                     "adds FID, sFID and IS."),
    untrained_reference: bool = typer.Option(True, help="Sample the untrained-DiT reference row too."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: the sample set's)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Measure a sample set against a data set's train split: the Fréchet distance, precision,
    recall and class accuracy in a trained classifier's features, with reference rows (the
    test split, an untrained DiT, noise); FID, sFID and IS with --inception-weights.

    Example: localitylab evaluate-samples runs/dit-n-p1-digits --classifier runs/resnet-n-digits
    """
    from localitylab.errors import UserError
    from localitylab.generation.runs import EvaluateRequest, evaluate_samples
    from localitylab.progress import make_progress

    if classifier is None:
        raise UserError("evaluate-samples needs --classifier RUN: a classifier trained on the same data "
                        "(e.g. localitylab train resnet-n digits), whose features the distances are measured in")
    table, csv = evaluate_samples(EvaluateRequest(
        str(samples), classifier, against=against, data_dir=str(data_dir) if data_dir else None, device=device,
        untrained_reference=untrained_reference, inception_weights=str(inception_weights) if inception_weights else None,
        out=out), make_progress(not quiet))
    _print_quality(table)
    print(f"-> {csv}")


def _print_quality(table) -> None:
    """One line per sample source: its metrics (with the class accuracy's 95% interval)."""
    for (model, setting), rows in table.groupby(["model", "setting"], sort=False, dropna=False):
        parts = []
        for row in rows.itertuples():
            text = f"{row.metric} {row.value:.4g}"
            if row.ci_low == row.ci_low and row.ci_low is not None:  # not NaN
                text += f" [{row.ci_low:.3g}, {row.ci_high:.3g}]"
            parts.append(text)
        n = rows["n_images"].iloc[0]
        print(f"{model}{f' ({setting})' if setting else ''}, {n} images: {'; '.join(parts)}")


def _default_probe_out(source: str) -> Path | None:
    """Where a probe writes without --out: a run's own probes/ folder (None: the library's
    default), else runs/probes/<model>, never the current folder."""
    from localitylab.io import safe_name
    from localitylab.probes.sources import is_checkpoint_source

    if is_checkpoint_source(source):
        return None
    return Path("runs") / "probes" / safe_name(source.replace("/", "-p").replace(":", "-"))


def _print_probe_list() -> None:
    from rich.console import Console
    from rich.table import Table

    from cli.errors import flag_of
    from localitylab.probes import get_probe, probe_names

    table = Table(title="localitylab probes")
    for column in ("probe", "measures", "applies to", "images (default)", "options"):
        table.add_column(column)
    for probe_name in probe_names():
        entry = get_probe(probe_name)
        images = (str(entry.default_images) if entry.default_images is not None
                  else f"the test split, up to {entry.max_default_images}")
        options = ", ".join(flag_of(option) for option in entry.option_names())
        table.add_row(probe_name, entry.summary, entry.applies_to, images, options)
    Console().print(table)


@app.command()
def plot(
    name: str = typer.Argument(..., help="The probe whose tables these are."),
    tables: List[Path] = typer.Argument(..., help="One or more <probe>.csv tables; models are overlaid."),
    out: Optional[Path] = typer.Option(None, help="Folder for the figures (default runs/plots/<probe>)."),
) -> None:
    """Draw a probe's figures from one or more tables, models overlaid.

    Example: localitylab plot attention-distance runs/a/probes/attention-distance.csv runs/b/probes/attention-distance.csv
    """
    from localitylab.probes import get_probe, read_table

    probe_obj = get_probe(name)
    frames = [read_table(path) for path in tables]
    for frame, path in zip(frames, tables):
        if not frame.empty and set(frame["probe"]) != {name}:
            from localitylab.errors import UserError

            raise UserError(f"{path} is a {', '.join(sorted(set(frame['probe'])))} table, not {name}")
    for figure in probe_obj.plot(frames, out if out is not None else Path("runs") / "plots" / probe_obj.name):
        print(f"figure: {figure}")


@app.command()
def report(
    runs: List[Path] = typer.Argument(..., help="Run folders (with run.json) or probe folders (with meta.json)."),
    out: Path = typer.Option(Path("reports/report"), help="Folder for report.html and report.pdf."),
    title: str = typer.Option("How much locality did each model learn?", help="The report's title."),
    format: List[str] = typer.Option(["html", "pdf"], "--format", help="html and/or pdf (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Write one HTML page and one PDF comparing the runs; reads tables only, runs no model.

    Example: localitylab report runs/pit-digits runs/vit-digits runs/resnet-digits --out reports/digits
    """
    from localitylab.progress import make_progress
    from localitylab.report import build_report

    for kind, path in build_report(runs, out, title=title, formats=tuple(format),
                                   progress=make_progress(not quiet)).items():
        print(f"{kind}: {path}")


study_app = typer.Typer(help="Run and inspect studies: experiment files that train, probe and report.",
                        no_args_is_help=True)
app.add_typer(study_app, name="study")


@study_app.command("run")
@slurm_options
def study_run(
    file: Path = typer.Argument(..., help="A study file (TOML), e.g. studies/demo.toml."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default runs/<study name>[-<scale>])."),
    scale: Optional[str] = typer.Option(None, help="Run the study's smaller variant [scale.NAME]."),
    jobs: int = typer.Option(1, help="Pieces to run at once (processes; CPU threads are divided)."),
    resume: bool = typer.Option(False, help="Continue a study in an existing --out, skipping what is done "
                                "(with SLURM: collect finished jobs, wait for queued ones, resubmit the rest)."),
    report_dir: Optional[Path] = typer.Option(None, help="Where the report goes (default <out>/report)."),
    executor: Optional[str] = typer.Option(None, help="local (this machine; the default) or slurm (every piece a "
                                           "SLURM job through submitit; the default for a folder submitted so)."),
    detach: bool = typer.Option(False, help="With --executor slurm: return once submitted (then study status, "
                                "and study run --resume to collect and report)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar and no line per piece (failures still print)."),
    slurm=None,
) -> None:
    """Train, probe and report everything a study file asks for; re-runs skip finished pieces.

    Example: localitylab study run studies/patch_size_scaling.toml --scale laptop --out runs/patch-scaling
    """
    from cli.study import run_study_command

    raise typer.Exit(run_study_command(file, out, scale, jobs, resume, report_dir, executor, slurm, detach, quiet))


@study_app.command("show")
@slurm_options
def study_show(
    file: Path = typer.Argument(..., help="A study file (TOML)."),
    scale: Optional[str] = typer.Option(None, help="Show the study's smaller variant [scale.NAME]."),
    executor: Optional[str] = typer.Option(None, help="slurm: also show the jobs that would be submitted."),
    slurm=None,
) -> None:
    """What a study would run, with FLOPs per run and an estimate of the time on this device.

    Example: localitylab study show studies/pit_vs_vit_cifar100.toml
    """
    from cli.study import show_study

    show_study(file, scale, executor, slurm)


@study_app.command("status")
def study_status(folder: Path = typer.Argument(..., help="A study's output folder (with study.json).")) -> None:
    """Each piece of a study: done, queued, running or failed, with its SLURM job and log.

    Example: localitylab study status runs/patch-scaling
    """
    from cli.study import print_status

    print_status(folder)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Where the demo's runs go."),
    report_dir: Optional[Path] = typer.Option(None, help="Where the demo's report goes (default <out>/report)."),
    overwrite_report: bool = typer.Option(False, help="Replace the report already in --report-dir (e.g. the "
                                          "committed reports/demo)."),
    jobs: int = typer.Option(2, help="Pieces to run at once."),
) -> None:
    """The demo study: pit-n, vit-n/2 and resnet-n on digits, clean and pixel-permuted,
    every probe, one report. Re-running skips what is done.

    Example: localitylab demo --out runs/demo
    """
    from cli.study import run_study_command
    from localitylab.errors import UserError
    from localitylab.studies import bundled_study

    if report_dir is not None and not overwrite_report and any((report_dir / name).exists()
                                                               for name in ("report.html", "report.pdf")):
        raise UserError(f"{report_dir} already holds a report (the committed one, if it is reports/demo); pass "
                        f"--overwrite-report to replace it, or leave --report-dir out (the report goes to "
                        f"{out}/report)")
    raise typer.Exit(run_study_command(bundled_study("demo"), out, None, jobs, True, report_dir))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = typer.main.get_command(app)
    words = [word for word in argv if not word.startswith("-")]
    if words[:1] == ["probe"]:  # its options come from the probes' settings: built now, from the registry
        single = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
        single.command("probe")(probe_command())
        command.commands["probe"] = typer.main.get_command(single)
    return run_cli(command, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Run a study: train every model (and seed, and permuted variant), probe every run, report.

Each piece runs once. A finished piece is skipped on a re-run; an interrupted training
resumes from its last checkpoint (bit-identical on CPU), an interrupted probe is run again.
Pieces run one after another, or several at once with `jobs` > 1 (separate processes, the
CPU threads divided between them). A piece that fails is reported, the others go on, and a
re-run does only what is not done.

A `pretrained = true` model (timm's pretrained weights) is not trained: it is probed once,
into <out>/runs/<label>/probes/.

With a [samples] table, every diffusion run is then sampled into <run>/samples/ and, with a
classifier, its samples measured there (the classifier run of the same seed, trained on the
natural pixel order: a permuted run's samples are put back in natural order first), which is
what the report's generation section reads.

Layout of the output folder:
    <out>/runs/<label>[-s<seed>][-perm<seed>]/   ckpt.pt, metrics.csv, run.json, probes/, samples/
    <out>/report/report.html, report.pdf
    <out>/study.json                            the plan and the state of each piece
"""

from __future__ import annotations

import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from localitylab.errors import UserError
from localitylab.io import safe_name, write_json
from localitylab.studies.pieces import (Plan, ProbePiece, SamplePiece, TrainPiece, call_piece, probe_done, run_probe,
                                        run_sample, run_train, sample_done, train_done)
from localitylab.studies.spec import SlurmSettings, StudyModel, Study, diffusion_labels


@dataclass
class StudyResult:
    plan: Plan
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    report: dict[str, Path] = field(default_factory=dict)


def make_plan(study: Study, out: str | Path) -> Plan:
    out = Path(out)
    many_seeds = len(study.seeds) > 1
    train, probe = [], []
    variants = [None] + ([study.permute_pixels] if study.permute_pixels is not None else [])
    by_key: dict[tuple, TrainPiece] = {}
    for entry in study.models:
        if entry.pretrained:  # not trained; its weights do not depend on the seed
            probe.append(ProbePiece(out / "runs" / entry.label, study.probes, study.probe_images,
                                    study.probe_batch_size, 0, study.probe_options, entry.model,
                                    study.dataset_of(entry)))
            continue
        for seed in study.seeds:
            for permute in variants:
                folder = entry.label + (f"-s{seed}" if many_seeds else "") + (f"-perm{permute}" if permute is not None else "")
                source = by_key[(study.sources[entry.label], seed, permute)] if entry.label in study.sources else None
                piece = TrainPiece(entry, seed, permute, out / "runs" / folder, source)
                by_key[(entry.label, seed, permute)] = piece
                train.append(piece)
                probe.append(ProbePiece(piece.run_dir, study.probes, study.probe_images, study.probe_batch_size,
                                        0, study.probe_options))
    return Plan(study, out, train, probe, _sample_pieces(study, train, by_key))


def _sample_pieces(study: Study, train: list[TrainPiece], by_key: dict[tuple, TrainPiece]) -> list[SamplePiece]:
    if not study.samples:
        return []
    settings = {k: v for k, v in study.samples.items() if k != "classifier"}
    classifier = study.samples.get("classifier")
    diffusion = diffusion_labels(study)
    return [SamplePiece(piece.run_dir, settings,
                        by_key[(classifier, piece.seed, None)].run_dir if classifier is not None else None)
            for piece in train if piece.entry.label in diffusion]


def study_folder(study: Study, out: str | Path | None, resume: bool) -> Path:
    """Where a study's runs go: `out`, or runs/<name>[-<scale>]. The default is built from
    names in the file (and its scale), sanitised so that it stays under runs/. A folder that
    already holds a study is continued only with `resume`."""
    folder = Path(out) if out is not None else Path("runs") / safe_name(study.name + (f"-{study.scale}" if study.scale else ""))
    if (folder / "study.json").is_file() and not resume:
        raise UserError(f"{folder} already holds a study; pass resume to continue it, or choose another out",
                        settings=("resume", "out"))
    return folder


def run_study(study: Study, out: str | Path, jobs: int = 1, log: Callable[[str], None] = print,
              formats: tuple[str, ...] = ("html", "pdf"), report_dir: str | Path | None = None,
              executor: str = "local", slurm: Any = None, detach: bool = False,
              progress: Callable[[int, int, dict[str, str]], None] | None = None) -> StudyResult:
    """Run what is not done and write the report. `executor`: "local" (here, `jobs` pieces at
    once) or "slurm" (each piece a job, `slurm` a SlurmSettings; with `detach`, return once
    submitted: no report yet). `progress(finished, total, {piece or job: state})` whenever a
    piece starts or ends here (state RUNNING), and while waiting for SLURM (its job states)."""
    if jobs < 1:
        raise UserError(f"jobs must be at least 1, got {jobs}", setting="jobs")
    if executor not in ("local", "slurm"):
        raise UserError(f"executor must be 'local' or 'slurm', got {executor!r}", setting="executor")
    plan = make_plan(study, out)
    ledger = _Ledger(StudyResult(plan), log, on_change=progress if executor == "local" else None)
    ledger.write()
    if executor == "slurm":
        from localitylab.studies.slurm import run_on_slurm

        if not run_on_slurm(plan, ledger, slurm or SlurmSettings(), detach, progress):
            return ledger.result  # submitted; `study status` and --resume take it from here
    else:
        _run_locally(plan, ledger, jobs)
    return _report(plan, ledger, formats, report_dir)


def _run_locally(plan: Plan, ledger: "_Ledger", jobs: int) -> None:
    study = plan.study
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    # Runs that start from another run's checkpoint wait for it: one wave per generation.
    waiting = list(plan.train)
    while waiting:
        ready = [p for p in waiting if p.source is None or p.source not in waiting]
        waiting = [p for p in waiting if p not in ready]
        for piece in [p for p in ready if p.source is not None and p.source.name in ledger.result.failed]:
            ready.remove(piece)
            ledger.record(piece, False, f"its starting point {piece.source.run_dir.name} failed")
        _run_stage(ready, lambda p: train_done(p, study), run_train, lambda p: (study, p, threads), jobs, ledger)
    trained = [p for p in plan.probe if p.ready and f"train {p.run_dir.name}" not in ledger.result.failed]
    _run_stage(trained, probe_done, run_probe, lambda p: (p, threads), jobs, ledger)
    failed = ledger.result.failed
    samplable = [p for p in plan.sample if p.ready and f"train {p.run_dir.name}" not in failed
                 and (p.classifier is None or f"train {p.classifier.name}" not in failed)]
    _run_stage(samplable, sample_done, run_sample, lambda p: (p, threads), jobs, ledger)


def _report(plan: Plan, ledger: "_Ledger", formats: tuple[str, ...], report_dir: str | Path | None) -> StudyResult:
    from localitylab.report.render import build_report

    study, result = plan.study, ledger.result
    runs = [p.run_dir for p in plan.train if (p.run_dir / "run.json").is_file()]
    runs += [p.run_dir / "probes" for p in plan.probe if p.pretrained and (p.run_dir / "probes" / "meta.json").is_file()]
    if runs:
        result.report = build_report(runs, Path(report_dir) if report_dir else plan.report_dir, title=study.title, formats=formats,
                                     expectations=expectations(study, plan))
        ledger.log(f"report {', '.join(str(p) for p in result.report.values())}")
    ledger.write()
    ledger.log(f"study {study.name}: {len(result.done)} done, {len(result.skipped)} skipped, {len(result.failed)} failed "
               f"in {time.perf_counter() - ledger.started:.0f} s")
    return result


@dataclass
class _Ledger:
    """A study's running account: each piece done, skipped or failed, logged with the whole
    study's progress and written to study.json as it happens."""

    result: StudyResult
    log: Callable[[str], None]
    # (finished, total, {piece: state}) on every change, for a progress bar; None: none.
    on_change: Callable[[int, int, dict[str, str]], None] | None = None
    started: float = field(default_factory=time.perf_counter)
    running: list[str] = field(default_factory=list)

    def counts(self) -> tuple[int, int]:
        """(pieces finished: done, skipped or failed; all pieces)."""
        plan, result = self.result.plan, self.result
        return (len(result.done) + len(result.skipped) + len(result.failed),
                len(plan.train) + len(plan.probe) + len(plan.sample))

    def progress(self) -> str:
        """Pieces finished of all pieces, and the time so far."""
        finished, total = self.counts()
        return f"[{finished}/{total} {time.perf_counter() - self.started:.0f}s]"

    def changed(self) -> None:
        if self.on_change is not None:
            self.on_change(*self.counts(), {name: "RUNNING" for name in self.running})

    def skip(self, piece) -> None:
        self.result.skipped.append(piece.name)
        self.log(f"{self.progress()} skip   {piece.name} (done)")
        self.changed()

    def start(self, piece) -> None:
        self.log(f"{self.progress()} start  {piece.name}")
        self.running.append(piece.name)
        self.changed()

    def record(self, piece, ok: bool, message: str) -> None:
        if ok:
            self.result.done.append(piece.name)
            self.log(f"{self.progress()} done   {piece.name}: {message}")
        else:
            self.result.failed[piece.name] = message
            self.log(f"{self.progress()} FAILED {piece.name}: {message.splitlines()[0]}")
        if piece.name in self.running:
            self.running.remove(piece.name)
        self.write()
        self.changed()

    def write(self) -> None:
        _write_state(self.result.plan, self.result)


def _run_stage(pieces: list, is_done: Callable, function: Callable[..., str], make_args: Callable, jobs: int,
               ledger: _Ledger) -> None:
    """Run the pieces that are not done: here one after another, or `jobs` at a time in
    worker processes. A failed piece is recorded; the others go on."""
    todo = []
    for piece in pieces:
        if is_done(piece):
            ledger.skip(piece)
        else:
            todo.append(piece)
    if jobs == 1 or len(todo) <= 1:
        for piece in todo:
            ledger.start(piece)
            ledger.record(piece, *call_piece(function, *make_args(piece)))
        return
    import multiprocessing

    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {}
        for piece in todo:
            ledger.start(piece)
            futures[pool.submit(call_piece, function, *make_args(piece))] = piece
        for future in as_completed(futures):
            ledger.record(futures[future], *future.result())


def _write_state(plan: Plan, result: StudyResult) -> None:
    write_json(plan.out / "study.json", {
        "study": str(plan.study.path), "name": plan.study.name, "scale": plan.study.scale,
        "pieces": [p.name for p in plan.train + plan.probe + plan.sample],
        "done": result.done, "skipped": result.skipped, "failed": result.failed,
    })


def expectations(study: Study, plan: Plan) -> list[dict[str, Any]]:
    """The study's published numbers beside ours (mean over seeds of the clean runs)."""
    import json

    rows = []
    for expected in study.expect:
        wanted = expected["model"]
        if "probe" in expected:
            rows.append(probe_expectation(study, plan, expected))
            continue
        if is_sample_metric(expected.get("metric", "")):
            rows.append(sample_expectation(study, plan, expected))
            continue
        accuracies = []
        for piece in plan.train:
            if piece.permute is not None:
                continue
            if wanted not in (piece.entry.label, piece.entry.model) and not _maps_to(study, wanted, piece.entry):
                continue
            run_json = piece.run_dir / "run.json"
            if run_json.is_file() and json.loads(run_json.read_text())["metrics"].get("test_acc") is not None:
                accuracies.append(json.loads(run_json.read_text())["metrics"]["test_acc"])
        ours = statistics.mean(accuracies) if accuracies else None
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else None
        rows.append({
            "setting": expected.get("setting", "") + (f" (ours at scale '{study.scale}': {study.dataset})" if study.scale else ""),
            "model": wanted, "metric": expected.get("metric", "accuracy"),
            "published": expected["published"], "ours": ours, "spread": spread, "n_seeds": len(accuracies),
            "source": expected.get("source", "published"),
        })
    return rows


def probe_expectation(study: Study, plan: Plan, expected: dict[str, Any]) -> dict[str, Any]:
    """A published fact beside the number it is about, read from each matching run's probe table
    (the metric at the chosen layer, reduced over heads; the mean over seeds)."""
    from localitylab.probes.output import read_table

    wanted, metric = expected["model"], expected["metric"]
    layer, heads = expected.get("layer", "last"), expected.get("heads", "mean")
    values = []
    folders = [p.run_dir for p in plan.train if p.permute is None
               and (wanted in (p.entry.label, p.entry.model) or _maps_to(study, wanted, p.entry))]
    folders += [p.run_dir for p in plan.probe if p.pretrained
                and (wanted == p.run_dir.name or wanted == p.pretrained or study.model_map.get(wanted) == p.pretrained)]
    for folder in folders:
        path = folder / "probes" / f"{expected['probe']}.csv"
        if not path.is_file():
            continue
        table = read_table(path)
        rows = table[(table["metric"] == metric) & table["value"].notna()]
        if rows.empty:
            continue
        at = {"first": rows["layer"].min(), "last": rows["layer"].max()}.get(layer, layer)
        per_head = rows.loc[rows["layer"] == at, "value"]
        if len(per_head):
            values.append(float(getattr(per_head, heads)()))
    where = f"{metric}, {'layer ' + str(layer) if isinstance(layer, int) else layer + ' layer'}, {heads} over heads"
    return {"setting": (expected.get("setting", "") + f" [ours: {where}]").strip(), "model": wanted, "metric": metric,
            "published": expected["published"], "ours": statistics.mean(values) if values else None,
            "spread": statistics.stdev(values) if len(values) > 1 else None, "n_seeds": len(values),
            "source": expected.get("source", "published")}


SAMPLE_METRICS = ("fid", "sfid", "inception_score")
SAMPLE_METRIC_PREFIXES = ("fd_", "precision_", "recall_", "class_accuracy_")


def is_sample_metric(metric: str) -> bool:
    return metric in SAMPLE_METRICS or metric.startswith(SAMPLE_METRIC_PREFIXES)


def sample_expectation(study: Study, plan: Plan, expected: dict[str, Any]) -> dict[str, Any]:
    """A published sample-quality figure beside the same metric of our samples (<run>/samples/
    sample-quality.csv, the samples' own row over all of them; the mean over seeds). FID, sFID
    and IS are ours only when the study gives Inception weights."""
    from localitylab.probes.output import read_table

    wanted, metric = expected["model"], expected["metric"]
    values = []
    for piece in plan.train:
        if piece.permute is not None or not (wanted in (piece.entry.label, piece.entry.model)
                                             or _maps_to(study, wanted, piece.entry)):
            continue
        path = piece.run_dir / "samples" / "sample-quality.csv"
        if not path.is_file():
            continue
        table = read_table(path)
        rows = table[(table["metric"] == metric) & ~table["model"].str.startswith("reference:")
                     & ~table["setting"].fillna("").str.contains("first ") & table["value"].notna()]
        if len(rows):
            values.append(float(rows["value"].iloc[0]))
    return {"setting": f"{metric}: " + expected.get("setting", "") + (f" (ours at scale '{study.scale}': {study.dataset})"
                                                                     if study.scale else ""),
            "model": wanted, "metric": metric, "published": expected["published"],
            "ours": statistics.mean(values) if values else None,
            "spread": statistics.stdev(values) if len(values) > 1 else None, "n_seeds": len(values),
            "source": expected.get("source", "published")}


def _maps_to(study: Study, wanted: str, entry: StudyModel) -> bool:
    # Under a scale, 'pit-t' in [[expect]] refers to the model that replaced it (e.g. pit-n).
    return study.model_map.get(wanted) == entry.model


# --- study show ------------------------------------------------------------------------------
def describe_plan(study: Study, out: str | Path = "runs/study") -> dict[str, Any]:
    """The plan with FLOPs per run and an estimate of the time on this device."""
    import torch

    from localitylab.models.describe import count_flops
    from localitylab.models.registry import build_model
    from localitylab.train.loop import model_spec_for
    from localitylab.train.snapshots import planned_snapshots
    from localitylab.data.registry import DataInfo

    plan = make_plan(study, out)
    throughput = measured_matmul_flops()
    rows, total, snapshot_s = [], 0.0, 0.0
    for piece in plan.train:
        config = piece.config(study)
        shapes = dataset_shapes(config.dataset)
        info = DataInfo(config.dataset, shapes["img_size"], shapes["in_chans"], ["c"] * shapes["num_classes"], [0.0], [1.0])
        spec = model_spec_for(config, info)
        with torch.device("meta"):
            model = build_model(spec)
            flops = count_flops(model, spec.in_chans, spec.img_size)
        # Training costs about 3x the forward pass (forward + backward for inputs and weights).
        train_flops = 3 * flops * shapes["train_images"] * config.epochs
        total += train_flops
        snapshots, seconds = planned_snapshots(config, shapes["train_images"], sum(p.numel() for p in model.parameters()))
        snapshot_s += seconds
        if study.probe_options.get("over_training") and study.probes:  # every snapshot probed: about 3 passes each
            probe_flops = 3 * flops * (study.probe_images or 256) * len(study.probes)
            total += snapshots * probe_flops
        rows.append({"run": piece.run_dir.name, "model": piece.entry.model, "dataset": config.dataset, "seed": piece.seed,
                     "permute_pixels": config.permute_pixels, "pixel_permutation": config.pixel_permutation_setting(), "epochs": config.epochs, "gflops_per_image": flops / 1e9,
                     "train_pflops": train_flops / 1e15, "snapshots": snapshots, "done": train_done(piece, study)})
    return {"study": study.name, "title": study.title, "dataset": study.dataset, "scale": study.scale,
            "scales": study.scales, "gpu_hours": study.gpu_hours, "runs": rows, "probes": study.probes,
            "pretrained": [{"run": p.run_dir.name, "model": p.pretrained, "done": probe_done(p)}
                           for p in plan.probe if p.pretrained],
            "probe_images": study.probe_images, "total_train_pflops": total / 1e15,
            "device_matmul_gflops": throughput["gflops"], "device": throughput["device"],
            "estimated_hours": (total / (throughput["gflops"] * 1e9 * ASSUMED_UTILISATION) + snapshot_s) / 3600}


# Training reaches a fraction of the device's measured matmul throughput; 0.3 is what
# pit-n reached on this 2-core CPU (about 90 GFLOP/s of training work against a
# single-matmul peak near 300), and a reasonable planning figure for a tuned GPU loop.
ASSUMED_UTILISATION = 0.3


def measured_matmul_flops(size: int = 1024, repeats: int = 5) -> dict[str, Any]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return {"device": device, "gflops": 2 * size**3 / best / 1e9}


def dataset_shapes(name: str) -> dict[str, int]:
    """Shapes and sizes of a data set without loading it where they are known."""
    from localitylab.data.registry import known_shape, load_dataset

    shape = known_shape(name)
    if shape is not None:
        return {"img_size": shape.img_size, "in_chans": shape.in_chans, "num_classes": shape.num_classes,
                "train_images": shape.train_images}

    data = load_dataset(name)
    return {"img_size": data.info.img_size, "in_chans": data.info.in_chans, "num_classes": data.info.num_classes,
            "train_images": len(data.train_images)}

"""A study's pieces (a training, a probing, a sampling), whether each is done, and how one
runs: what both executors share. runner.py runs them here (one after another or in worker
processes), slurm.py runs each as a SLURM job (the list from `piece_work`); both run one
through `call_piece`, so a piece fails the same way under either.
"""

from __future__ import annotations

import dataclasses
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from localitylab.errors import UserError
from localitylab.studies.spec import Study, StudyModel


@dataclass
class TrainPiece:
    entry: StudyModel
    seed: int
    permute: int | None
    run_dir: Path
    source: "TrainPiece | None" = None  # the run whose checkpoint this one starts from

    @property
    def init_from(self) -> Path | None:
        return self.source.run_dir / "ckpt.pt" if self.source is not None else None

    def config(self, study: Study):
        return study.train_config(self.entry, self.seed, self.permute, self.run_dir, self.init_from)

    @property
    def name(self) -> str:
        return f"train {self.run_dir.name}"


@dataclass
class ProbePiece:
    run_dir: Path
    probes: list[str]
    images: int
    batch_size: int
    seed: int
    options: dict[str, Any]
    pretrained: str | None = None  # timm:NAME[.TAG] probed with timm's pretrained weights (no checkpoint)
    data: str | None = None  # the data set to probe a pretrained model on

    @property
    def name(self) -> str:
        return f"probe {self.run_dir.name}"

    @property
    def ready(self) -> bool:
        """Is there a model to probe (a checkpoint, or pretrained weights)?"""
        return self.pretrained is not None or (self.run_dir / "ckpt.pt").is_file()


@dataclass
class SamplePiece:
    """Sample a diffusion run and, with a classifier run, measure the samples (`localitylab
    sample` then `evaluate-samples`), into <run>/samples/."""

    run_dir: Path
    settings: dict[str, Any]  # [samples]: n, guidance, steps, sampler, batch_size, inception_weights
    classifier: Path | None = None  # the classifier's run folder

    @property
    def name(self) -> str:
        return f"sample {self.run_dir.name}"

    @property
    def ready(self) -> bool:
        return (self.run_dir / "ckpt.pt").is_file()

    def request(self):
        from localitylab.generation.runs import SampleRequest

        keys = ("n", "guidance", "steps", "sampler", "batch_size")
        return SampleRequest(str(self.run_dir / "ckpt.pt"), device="auto",
                             **{k: self.settings[k] for k in keys if k in self.settings})


@dataclass
class Plan:
    study: Study
    out: Path
    train: list[TrainPiece]
    probe: list[ProbePiece]
    sample: list[SamplePiece] = field(default_factory=list)

    @property
    def report_dir(self) -> Path:
        return self.out / "report"


# --- is a piece done? ----------------------------------------------------------------------
def train_done(piece: TrainPiece, study: Study) -> bool:
    import json

    run_json = piece.run_dir / "run.json"
    if not run_json.is_file() or not (piece.run_dir / "ckpt.pt").is_file():
        return False
    try:
        run = json.loads(run_json.read_text())
    except json.JSONDecodeError:
        return False
    try:
        wanted = piece.config(study)
    except UserError:  # a recipe that cannot run is not done; training it says why
        return False
    return run.get("epochs_done") == wanted.epochs and run.get("config", {}).get("epochs") == wanted.epochs


def probe_done(piece: ProbePiece) -> bool:
    import json

    from localitylab.probes.registry import probe_names

    meta_path = piece.run_dir / "probes" / "meta.json"
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text()).get("probes", {})
    except json.JSONDecodeError:
        return False
    names = probe_names() if piece.probes == ["all"] else piece.probes
    options = {k: v for k, v in piece.options.items() if k != "over_training"}  # a setting, not an option
    for name in names:
        entry = meta.get(name)
        if entry is None or not (piece.run_dir / "probes" / f"{name}.csv").is_file():
            return False
        if piece.options.get("over_training") and not (piece.run_dir / "probes" / "over-training" / f"{name}.csv").is_file():
            return False
        same = (entry.get("images_requested"), entry.get("seed"), entry.get("options"))
        if same != (piece.images, piece.seed, options):
            return False
    return True


def sample_done(piece: SamplePiece) -> bool:
    """The samples are there, drawn as the study asks, and measured with its classifier."""
    import json

    folder = piece.run_dir / "samples"
    wanted = piece.request()
    try:
        from localitylab.generation.samples import read_samples

        meta = read_samples(folder).meta
    except UserError:
        return False
    drawn = {k: meta.get(k) for k in ("n", "guidance", "steps", "sampler", "seed")}
    if drawn != {"n": wanted.n, "guidance": wanted.guidance, "steps": wanted.steps, "sampler": wanted.sampler,
                 "seed": wanted.seed}:
        return False
    if piece.classifier is None:
        return True
    try:
        measured = json.loads((folder / "sample-quality.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (measured.get("classifier_source") == str(piece.classifier)
            and measured.get("inception_weights") == piece.settings.get("inception_weights"))


# --- running a piece (in this process or a worker) ---------------------------------------
def run_train(study: Study, piece: TrainPiece, threads: int | None) -> str:
    import torch

    from localitylab.train.loop import train

    if threads:
        torch.set_num_threads(threads)
    final = train(piece.config(study)).final
    if final.get("test_acc") is None:  # pre-training: no classifier to score
        return f"{piece.run_dir.name}: test loss {final.get('test_loss', float('nan')):.4f}"
    return f"{piece.run_dir.name}: test accuracy {final['test_acc']:.4f}"


def run_probe(piece: ProbePiece, threads: int | None) -> str:
    import torch

    from localitylab.probes.runner import ProbeRequest, run_probes

    if threads:
        torch.set_num_threads(threads)
    if piece.pretrained:
        request = ProbeRequest(source=piece.pretrained, pretrained=True, data=piece.data, out=piece.run_dir / "probes",
                               label=piece.run_dir.name,
                               n_images=piece.images, batch_size=piece.batch_size, seed=piece.seed, device="auto",
                               options=dict(piece.options))
    else:
        options = {k: v for k, v in piece.options.items() if k != "over_training"}
        request = ProbeRequest(source=str(piece.run_dir / "ckpt.pt"), n_images=piece.images,
                               batch_size=piece.batch_size, seed=piece.seed, device="auto", options=options)
        if piece.options.get("over_training"):  # the last model's tables, then every snapshot's (resumable)
            run_probes(list(piece.probes), request)
            request = dataclasses.replace(request, over_training=True)
    outputs = run_probes(list(piece.probes), request)
    return f"{piece.run_dir.name}: {', '.join(o.probe for o in outputs)}"


def run_sample(piece: SamplePiece, threads: int | None) -> str:
    import torch

    from localitylab.generation.runs import EvaluateRequest, evaluate_samples, sample_run

    if threads:
        torch.set_num_threads(threads)
    samples, folder = sample_run(piece.request())
    if piece.classifier is None:
        return f"{piece.run_dir.name}: {len(samples.images)} samples (no classifier to measure them with)"
    table, _ = evaluate_samples(EvaluateRequest(str(folder), str(piece.classifier), device="auto",
                                                inception_weights=piece.settings.get("inception_weights")))
    ours = table[(table["model"] == samples.meta["model"]) & (table["setting"] == samples.setting)]
    values = ", ".join(f"{row.metric} {row.value:.4g}" for row in ours.itertuples())
    return f"{piece.run_dir.name}: {len(samples.images)} samples; {values}"


def call_piece(function: Callable[..., str], *args: Any) -> tuple[bool, str]:
    """Run a piece; never let its failure escape (the study goes on)."""
    try:
        return True, function(*args)
    except UserError as err:
        return False, str(err)
    except Exception as err:  # a dead piece is reported, not fatal to the study
        return False, f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=4)}"


def piece_work(plan: Plan) -> list[tuple[Any, Callable[[], bool], Callable[..., str], tuple, list[str]]]:
    """Every piece in the order it can run: (piece, is it done?, its function, its arguments
    (the thread count last), the names of the pieces it waits for)."""
    study = plan.study
    work: list[tuple[Any, Callable[[], bool], Callable[..., str], tuple, list[str]]] = []
    for piece in plan.train:
        work.append((piece, lambda p=piece: train_done(p, study), run_train, (study, piece, None),
                     [piece.source.name] if piece.source is not None else []))
    for piece in plan.probe:
        work.append((piece, lambda p=piece: probe_done(p), run_probe, (piece, None),
                     [] if piece.pretrained else [f"train {piece.run_dir.name}"]))
    for piece in plan.sample:
        after = [f"train {piece.run_dir.name}"] + ([f"train {piece.classifier.name}"] if piece.classifier else [])
        work.append((piece, lambda p=piece: sample_done(p), run_sample, (piece, None), after))
    return work

"""Sample a diffusion run and evaluate a sample set: what `localitylab sample` and
`localitylab evaluate-samples` call.

Layout: `<run>/samples/samples.npz` and `samples.png`; `<run>/samples/sample-quality.csv`
and `meta.json` beside them (or the request's `out`). A model trained on permuted pixels
(`permute_pixels`) generates permuted images; they are put back in natural order before
they are written, so every sample set on disk is in natural pixel order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from localitylab.data.permutation import invert_permutation, permute_pixels
from localitylab.data.registry import DataOptions, load_dataset
from localitylab.diffusion.sampling import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, balanced_labels, generate
from localitylab.errors import UserError
from localitylab.generation.quality import PROBE, feature_space, reference_sources, sample_quality, sample_sources
from localitylab.generation.samples import ARRAY_NAME, SampleSet, read_samples, write_samples
from localitylab.io import check_folder, make_folder, write_json
from localitylab.progress import SILENT, Progress

QUALITY_NAME = f"{PROBE}.csv"


@dataclass
class SampleRequest:
    source: str  # a run folder or checkpoint of a diffusion run (or dit-*/P: untrained)
    n: int = 1000
    steps: int = DEFAULT_STEPS
    guidance: float = 1.0
    sampler: str = DEFAULT_SAMPLER
    seed: int = 0
    batch_size: int = 256
    device: str = "auto"
    data: str | None = None  # for a registry name: the data set that gives its shapes
    out: Path | None = None


def check_sample_request(request: SampleRequest) -> None:
    if request.n < 1:
        raise UserError(f"n must be at least 1, got {request.n}", setting="n")
    if request.batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {request.batch_size}", setting="batch_size")
    if request.sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {request.sampler!r}; valid: {', '.join(SAMPLERS)}")
    if not request.guidance >= 1.0:
        raise UserError(f"guidance must be at least 1 (1 = the conditional model alone), got {request.guidance}",
                        setting="guidance")


def sample_run(request: SampleRequest, progress: Progress = SILENT) -> tuple[SampleSet, Path]:
    """Draw `request.n` class-balanced samples from a diffusion run and write them; returns
    the sample set and its folder. `progress` counts the images drawn."""
    from localitylab.probes.sources import load_target

    check_sample_request(request)
    if request.out is not None:
        check_folder(request.out)
    target, _ = load_target(request.source, request.device, request.data, DataOptions(seed=request.seed))
    if target.denoising is None:
        raise UserError(f"{target.spec.name} is not a diffusion model; sample reads a dit-*/P run "
                        f"(trained with task diffusion)", setting="task")
    schedule = target.denoising.objective.schedule
    if not 1 <= request.steps <= schedule.num_timesteps:
        raise UserError(f"steps must be between 1 and {schedule.num_timesteps}, got {request.steps}", setting="steps")
    labels = balanced_labels(request.n, target.spec.num_classes)
    images = generate(target.model, labels, schedule, in_chans=target.spec.in_chans, img_size=target.spec.img_size,
                      sampler=request.sampler, steps=request.steps, guidance=request.guidance, seed=request.seed,
                      batch_size=request.batch_size, null_class=target.model.null_class,
                      amp=target.device.type == "cuda", progress=progress)
    permutation = target.data.permutation
    if permutation is not None:  # generated in the permuted order the model was trained in
        images = permute_pixels(images, invert_permutation(permutation))
    meta = {
        "model": target.display_name, "source": target.source, "model_spec": target.spec.to_dict(),
        "data": target.data.name, "class_names": list(target.data.class_names),
        "sampler": request.sampler, "steps": request.steps, "guidance": request.guidance, "seed": request.seed,
        "n": request.n, "labels": "balanced: image i has label i mod classes", "schedule": schedule.to_dict(),
        "permute_seed": target.data.permute_seed, "unpermuted": permutation is not None,
        "bf16": target.device.type == "cuda",
    }
    folder = Path(request.out) if request.out is not None else _default_folder(target)
    samples = SampleSet(images, labels, meta)
    write_samples(make_folder(folder), samples)
    return samples, folder


def _default_folder(target) -> Path:
    if target.run_dir is not None:
        return target.run_dir / "samples"
    return Path("samples") / target.spec.name.replace("/", "-p")


@dataclass
class EvaluateRequest:
    samples: str  # a sample set (samples.npz) or the folder that holds it (or a run folder)
    classifier: str  # a run folder or checkpoint of a classifier trained on the same data
    against: str | None = None  # the data set (default: the one the samples' model was trained on)
    data_dir: str | None = None
    device: str = "auto"
    untrained_reference: bool = True
    inception_weights: str | None = None
    out: Path | None = None


def evaluate_samples(request: EvaluateRequest, progress: Progress = SILENT) -> tuple[pd.DataFrame, Path]:
    """The sample-quality table of a sample set with its reference rows; written as CSV.
    `progress` counts its steps (features of each source, Inception)."""
    from localitylab.probes.output import write_table
    from localitylab.probes.sources import load_target

    path = Path(request.samples).expanduser()
    if path.is_dir() and not (path / ARRAY_NAME).is_file() and (path / "samples" / ARRAY_NAME).is_file():
        path = path / "samples"  # a run folder
    samples = read_samples(path)
    folder = Path(request.out) if request.out is not None else (path if path.is_dir() else path.parent)
    check_folder(folder)
    against = request.against or samples.meta.get("data")
    if not against:
        raise UserError("the sample set does not say which data set its model learned; name it with against",
                        setting="against")
    dataset = load_dataset(against, DataOptions(data_dir=Path(request.data_dir) if request.data_dir else None))
    classifier, _ = load_target(request.classifier, request.device, against)
    if classifier.denoising is not None:
        raise UserError(f"{classifier.spec.name} is a diffusion model; classifier must name a run that classifies "
                        f"images (e.g. resnet-n) trained on {against}", setting="classifier")
    if classifier.run_dir is None:
        raise UserError(f"classifier {request.classifier}: give the run folder or checkpoint of a trained network; "
                        "an untrained network's features measure nothing", setting="classifier")
    space = feature_space(classifier)
    with progress.task("evaluating samples (steps)", total=3 if request.inception_weights else 2) as task:
        sources = [*sample_sources(samples, len(dataset.test_images)),
                   *reference_sources(dataset, samples, request.untrained_reference)]
        task.advance()
        table = sample_quality(space, dataset.train_images, sources)
        task.advance()
        if request.inception_weights:
            from localitylab.generation.inception import inception_rows, load_inception

            extractor = load_inception(request.inception_weights, classifier.device)
            table = pd.concat([table, inception_rows(extractor, dataset.train_images, sources)], ignore_index=True)
            task.advance()
    csv = write_table(table, make_folder(folder) / QUALITY_NAME)
    write_json(folder / "sample-quality.json", {
        "samples": str(path), "sample_meta": samples.meta, "against": against, "reference": "train split",
        "classifier": classifier.display_name, "classifier_source": classifier.source,
        "inception_weights": request.inception_weights, "device": str(classifier.device),
    })
    return table, csv

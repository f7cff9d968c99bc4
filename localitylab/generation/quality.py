"""Sample quality in the feature space of a classifier the toolkit trained, with the
reference rows that say what the numbers mean.

For a sample set and a classifier run (e.g. `resnet-n` on the same data), against the
data set's train split (the distribution the generator learned):

- `fd_<classifier>`: the Fréchet distance between the classifier's pre-logit features of
  the samples and of the train split. It is not FID (which is this distance in
  Inception-v3's pool features, `localitylab.generation.inception`); it is named for the
  network whose features it uses.
- `precision_<classifier>`, `recall_<classifier>`: k-NN precision and recall in the same
  features (Kynkäänniemi et al. 2019, k = 3).
- `class_accuracy_<classifier>`: the share of samples the classifier assigns to the label
  they were conditioned on.

Reference rows, measured the same way in the same table:

- `reference: test split` (the floor): real images the generator never saw, with their
  true labels; what a perfect generator would score, given as many images.
- `reference: untrained DiT` (the ceiling): the same sampler, seed and steps with a
  denoiser that predicts zero noise, which is exactly what an untrained DiT predicts
  (adaLN-Zero starts its output layer at zero), whatever its size and patch.
- `reference: noise`: the sampler's starting noise x_T, quantised as an image.

Both Fréchet distance and precision/recall depend on how many images they rest on; the
`n_images` column says how many, and comparisons should use equal counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pandas as pd
import torch
import torch.nn as nn

from localitylab.data.registry import ImageDataset
from localitylab.diffusion.objective import Schedule, to_uint8
from localitylab.diffusion.feature_metrics import PRECISION_RECALL_K, classifier_outputs, frechet_distance, precision_recall
from localitylab.diffusion.sampling import generate, initial_noise
from localitylab.errors import UserError
from localitylab.generation.samples import SampleSet
from localitylab.probes.base import Measurements

PROBE = "sample-quality"
FLOOR = "reference: test split"
UNTRAINED = "reference: untrained DiT"
NOISE = "reference: noise"


@dataclass
class FeatureSpace:
    """A trained classifier seen as a feature extractor: its pre-logits and its prediction."""

    model: nn.Module
    name: str  # the metric suffix: 'resnet-n' gives fd_resnet-n
    prepare: Callable[[torch.Tensor], torch.Tensor]  # uint8 images -> the classifier's input
    in_chans: int
    img_size: int
    num_classes: int
    batch_size: int = 512

    def outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, predicted class) for uint8 images."""
        features, logits = classifier_outputs(self.model, self.prepare, images, self.batch_size)
        return features, logits.argmax(-1)

    def check(self, images: torch.Tensor, labels: torch.Tensor, what: str) -> None:
        shape = (self.in_chans, self.img_size, self.img_size)
        if tuple(images.shape[1:]) != shape:
            raise UserError(f"{what} are {tuple(images.shape[1:])} images and the classifier {self.name} takes "
                            f"{shape}; use a classifier trained on the same data")
        if len(labels) and int(labels.max()) >= self.num_classes:
            raise UserError(f"{what} have labels up to {int(labels.max())} and the classifier {self.name} knows "
                            f"{self.num_classes} classes")


class ZeroNoise(nn.Module):
    """The untrained DiT's prediction: zero noise, for any input (adaLN-Zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # gives the sampler a device

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(noisy)


@dataclass
class Source:
    """One row group of the table: a set of images with the labels they stand for."""

    name: str  # the table's `model` column
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor
    setting: str = ""
    note: str = ""


def sample_sources(samples: SampleSet, floor_count: int | None = None) -> list[Source]:
    """The samples, and (when there are more of them than `floor_count`, the test split's
    size) their first `floor_count` too: a Fréchet distance to compare with the floor's at
    an equal count (the labels are balanced, so the first ones are too)."""
    name, setting = str(samples.meta.get("model", "samples")), samples.setting
    sources = [Source(name, samples.images, samples.labels, setting)]
    if floor_count is not None and len(samples.images) > floor_count:
        sources.append(Source(name, samples.images[:floor_count], samples.labels[:floor_count],
                              f"{setting}, first {floor_count}" if setting else f"first {floor_count}",
                              "as many samples as the test split has images: compare with the floor"))
    return sources


def reference_sources(dataset: ImageDataset, samples: SampleSet, untrained: bool = True) -> list[Source]:
    """The reference rows for `samples`: the test split, the untrained DiT, the noise."""
    n, chans, side = len(samples.images), samples.images.shape[1], samples.images.shape[-1]
    meta = samples.meta
    seed = int(meta.get("seed", 0))
    sources = [Source(FLOOR, dataset.test_images, dataset.test_labels, "",
                      "real images the generator never saw, with their labels: the floor")]
    if untrained and "sampler" in meta:
        schedule = Schedule(**meta["schedule"]) if "schedule" in meta else Schedule()
        images = generate(ZeroNoise(), samples.labels, schedule, in_chans=chans, img_size=side,
                          sampler=meta["sampler"], steps=int(meta["steps"]), guidance=1.0, seed=seed,
                          null_class=-1, batch_size=1024)
        sources.append(Source(UNTRAINED, images, samples.labels, f"{meta['sampler']}, {meta['steps']} steps",
                              "the same sampler, seed and steps with zero predicted noise, as an untrained DiT "
                              "predicts: the ceiling"))
    noise = to_uint8(initial_noise((chans, side, side), seed, range(n)))
    sources.append(Source(NOISE, noise, samples.labels, "", "the sampler's starting noise x_T, as an image"))
    return sources


def sample_quality(space: FeatureSpace, reference: torch.Tensor, sources: list[Source],
                   k: int = PRECISION_RECALL_K, seed: int = 0) -> pd.DataFrame:
    """The tidy table (one row per source and metric) of every source against `reference` images."""
    space.check(reference, torch.zeros(0, dtype=torch.long), "the reference images")
    reference_features, _ = space.outputs(reference)
    frames = []
    for source in sources:
        space.check(source.images, source.labels, source.name)
        features, predicted = space.outputs(source.images)
        precision, recall = precision_recall(reference_features, features, k=k)
        n, setting = len(source.images), source.setting
        rows = Measurements()
        rows.single(f"fd_{space.name}", frechet_distance(features, reference_features), setting=setting,
                    note=source.note, n_images=n)
        rows.single(f"precision_{space.name}", precision, setting=setting, note=f"k={k}", n_images=n)
        rows.single(f"recall_{space.name}", recall, setting=setting, note=f"k={k}", n_images=n)
        rows.per_image(f"class_accuracy_{space.name}", (predicted == source.labels.cpu()).double(), setting=setting,
                       note="the classifier's class against the conditioning label")
        rows.add_intervals(seed)  # the accuracy's 95% bootstrap interval over images
        frames.append(rows.to_frame(source.name, PROBE))
    return pd.concat(frames, ignore_index=True)


def feature_space(target) -> FeatureSpace:
    """The feature space of a loaded classifier (`localitylab.probes.target.ProbeTarget`)."""
    return FeatureSpace(target.model, target.spec.name, target.prepare, target.data.in_chans, target.data.img_size,
                        target.spec.num_classes)

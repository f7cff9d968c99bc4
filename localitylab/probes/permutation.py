"""Pixel-permutation probe: how much does a trained model care where its pixels are?

Test-time shuffles of the natural image (before the model's own preparation, so a model
trained on permuted pixels (TrainConfig's `permute_pixels`) still gets its training permutation on top):

- `global`: one fixed random permutation of all H*W positions.
- `local-k`: pixels shuffled inside each k x k window (windows cut at the border are
  shuffled within themselves).
- `swaps-T-d`: T random swaps of pixel pairs at most d pixels apart (d = inf: any pair),
  applied one after the other to the test images. T is swept as fractions of H*W. This is
  robustness (a model trained on natural pixels, tested on swapped ones), not the PiT
  paper's pixel-swap experiment, which trains and tests on swapped pixels: that is a
  training setting (TrainConfig's `permute_pixels`, `swaps` and `swap_distance` = d), and
  its number is the `clean` row of such a run, whose note names the permutation.
- `patch-shuffle-g`: the image cut into g x g tiles whose order is shuffled.

Every shuffle is a permutation `perm` of the flattened positions (out[p] = image[perm[p]]),
drawn from a seed derived from the probe's seed and the setting's name; the shuffles live in
`localitylab.data.permutation`, where `permutation_for_setting(setting, height, width,
seed)` rebuilds one exactly; the seed is in each row's `note`.

Per setting: `accuracy`, `accuracy_drop` (clean - altered, paired per image) and
`order_dependence` = (clean - altered) / (clean - chance), the share of the headroom above
chance the shuffle removes (localitylab/probes/order_dependence.py): raw drops are capped by
clean accuracy minus chance, so only the share compares models.

Equivariance certificate: permute the model's input pixels by pi and the position-embedding
rows by the same pi (in a copy of the model; [cls] and register rows untouched), and
compare its logits with the untouched model on the untouched input. Attention, MLPs and
[cls] pooling are permutation-equivariant/invariant over tokens, so a PiT agrees to float
rounding for any pi, a ViT only when pi moves whole patches; a ConvNet has no embedding to
permute, and its row is the error of permuting the input alone (not a certificate).
`equivariance_max_abs` = max |logits' - logits|; `equivariance_rel` = ||logits' - logits||_F
/ ||logits||_F, over the probe's images.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from pydantic import field_validator, model_validator

from localitylab.data.permutation import (distance_label, mean_displacement, parse_distance,
                                          permutation_for_setting, permute_pixels, setting_seed)
from localitylab.errors import UserError
from localitylab.probes.equivariance import (equivariance_rows, logit_difference,  # noqa: F401
                                             permutable_embedding, position_outside_table)
from localitylab.probes.order_dependence import order_dependence_rows
from localitylab.probes.base import Measurements, Probe, ProbeInputs, SummaryColumn
from localitylab.plotting import probes as drawings
from localitylab.probes.registry import register_probe
from localitylab.probes.target import ProbeTarget
from localitylab.probes.settings import option
from localitylab.settings import Settings

DEFAULT_WINDOW_SIZES = (2, 4, 8)
DEFAULT_TILE_GRIDS = (2, 4)
# Swap counts as fractions of H*W: the PiT paper's T = 25K at 224x224 is about 0.5 H*W.
DEFAULT_SWAP_FRACTIONS = (0.125, 0.25, 0.5, 1.0, 2.0)
DEFAULT_SWAP_DISTANCES: tuple[float, ...] = (2.0, math.inf)
DEFAULT_DRAWS = 3


# --- settings ---------------------------------------------------------------------------

def _number_list(options: dict[str, Any], key: str, default: tuple, cast: Callable[[Any], Any]) -> list:
    value = options.get(key, default)
    items = value if isinstance(value, (list, tuple)) else [value]
    try:
        return [cast(item) for item in items]
    except (TypeError, ValueError, UserError) as err:
        raise UserError(f"{key}: expected a number or a list of numbers, got {value!r} ({err})", setting=key) from None


def shuffle_settings(height: int, width: int, options: dict[str, Any]) -> list[str]:
    """The test-time shuffles to run on an image of this size, as table settings."""
    windows = _number_list(options, "window_sizes", DEFAULT_WINDOW_SIZES, int)
    grids = _number_list(options, "tile_grids", DEFAULT_TILE_GRIDS, int)
    fractions = _number_list(options, "swap_fractions", DEFAULT_SWAP_FRACTIONS, float)
    distances = _number_list(options, "swap_distances", DEFAULT_SWAP_DISTANCES, parse_distance)
    if any(w < 2 for w in windows) or any(g < 2 for g in grids) or any(f < 0 for f in fractions):
        raise UserError("window_sizes and tile_grids must be >= 2, swap_fractions >= 0",
                        settings=("window_sizes", "tile_grids", "swap_fractions"))
    settings = ["global"]
    # A window as large as the image is the global shuffle again.
    settings += [f"local-{k}" for k in windows if k < min(height, width)]
    for distance in distances:
        for fraction in fractions:
            settings.append(f"swaps-{round(fraction * height * width)}-{distance_label(distance)}")
    settings += [f"patch-shuffle-{g}" for g in grids if height % g == 0 and width % g == 0 and g <= min(height, width)]
    return list(dict.fromkeys(settings))


# --- the probe ------------------------------------------------------------------------------

class PermutationOptions(Settings):
    window_sizes: Any = option(DEFAULT_WINDOW_SIZES, "permutation: local-k window sizes, e.g. 2,4,8.")
    tile_grids: Any = option(DEFAULT_TILE_GRIDS, "permutation: patch-shuffle-g grids, e.g. 2,4.")
    swap_fractions: Any = option(DEFAULT_SWAP_FRACTIONS, "permutation: swap counts T as fractions of H*W.")
    swap_distances: Any = option(DEFAULT_SWAP_DISTANCES, "permutation: swap distances d in pixels ('inf': any pair).")
    draws: int = option(DEFAULT_DRAWS, "permutation: permutations drawn per setting; the intervals cover draws "
                        "and images.")

    @field_validator("draws", mode="before")
    @classmethod
    def _draws(cls, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"draws must be a whole number >= 1, got {value!r}")
        return value

    @model_validator(mode="after")
    def _values(self) -> "PermutationOptions":
        shuffle_settings(8, 8, self.shuffles())  # the values' checks do not depend on the image size (a UserError)
        return self

    def shuffles(self) -> dict[str, Any]:
        return self.model_dump(exclude={"draws"})


def draw_seeds(seed: int, setting: str, draws: int) -> list[int]:
    """The seeds of a setting's draws: the first is the setting's own seed (`setting_seed`)."""
    return [setting_seed(seed, setting if draw == 0 else f"{setting}#{draw}") for draw in range(draws)]


def trained_permutation_note(target: ProbeTarget) -> str:
    """'' for a model trained on natural pixels; else what the model was trained and is
    tested on (its run's permutation, applied to every test image before any shuffle)."""
    data = target.data
    if data.permutation is None:
        return ""
    how = {"global": "a full shuffle"}.get(data.permute_setting or "", data.permute_setting or "a pixel permutation")
    if how.startswith("swaps-"):
        _, count, distance = how.split("-")
        how = f"{count} swaps within distance {distance} (the PiT paper's train-time swap experiment)"
    return f"trained and tested on pixels permuted by {how}, seed {data.permute_seed}"


@torch.no_grad()
def correct_per_image(inputs: ProbeInputs, permutation: torch.Tensor | None, logits: dict | None = None) -> torch.Tensor:
    """(N,) 1.0 where the model's prediction on the image, with its pixels moved by
    `permutation` before the model's own preparation, is its label. `logits`, when given,
    receives each batch's logits (float64, by batch index): the clean pass's are the
    equivariance certificates' reference (`logit_difference`'s cache), not run again."""
    model = inputs.target.model
    was_training = model.training
    model.eval()
    transform = None
    if permutation is not None:
        on_device = permutation.to(inputs.target.device)
        transform = lambda batch: permute_pixels(batch, on_device)  # noqa: E731
    correct = []
    for index, batch in enumerate(inputs.batches(transform)):
        found = model(batch.inputs)
        if logits is not None:
            logits[index] = found.double()
        correct.append((found.argmax(-1) == batch.labels).double().cpu())
    model.train(was_training)
    return torch.cat(correct)


@register_probe
class PermutationProbe(Probe):
    name = "permutation"
    summary = ("Accuracy under test-time pixel shuffles (global, local-k, swaps-T-d, patch-shuffle-g) "
               "and the position-embedding equivariance certificate")
    applies_to = "every classifier (accuracies mean most for a trained one)"
    Options = PermutationOptions
    needs_labels = True
    default_images = None  # the whole test split where it is small: accuracies need many images
    denoiser_reason = ("it measures class accuracy; for generation, train with permute_pixels and compare "
                       "the samples' quality (evaluate-samples)")
    summary_columns = (
        SummaryColumn("global_drop", "acc drop, global shuffle",
                      "test accuracy lost under a global pixel shuffle (the mean over the probe's permutation draws)", "accuracy_drop",
                      setting="global", better="high", skip_tasks=("mae",),
                      sentence="depends most on pixel order (largest drop under a global shuffle)"),
    )

    def not_applicable(self, target: ProbeTarget) -> str | None:
        reason = super().not_applicable(target)
        if reason is None and target.no_head_reason():
            return f"{target.no_head_reason()}, so accuracies under shuffles do not apply"
        return reason

    def measure(self, inputs: ProbeInputs, out: Measurements) -> None:
        target = inputs.target
        height, width = inputs.images.shape[-2:]
        settings = shuffle_settings(height, width, inputs.options.shuffles())
        caveat = target.accuracy_caveat()
        trained_on = trained_permutation_note(target)
        clean_logits: dict = {}  # the untouched model on the untouched images, shared with the certificates
        clean = correct_per_image(inputs, None, clean_logits)
        chance = 1.0 / target.spec.num_classes if target.spec.num_classes > 0 else None
        out.per_image("accuracy", clean, setting="clean",
                      note="; ".join(n for n in (trained_on and f"{trained_on}: no test-time shuffle", caveat) if n))
        for setting in settings:
            seeds = draw_seeds(inputs.seed, setting, inputs.options.draws)
            permutations = [permutation_for_setting(setting, height, width, seed) for seed in seeds]
            correct = torch.stack([correct_per_image(inputs, permutation) for permutation in permutations])
            per_draw = correct.mean(dim=1)
            note = (f"seeds={seeds}: permutation_for_setting({setting!r}, {height}, {width}, seed) for each; "
                    f"accuracy per draw {', '.join(f'{a:.3f}' for a in per_draw.tolist())}"
                    + (f" (sd {float(per_draw.std()):.3f})" if len(seeds) > 1 else ""))
            if trained_on:
                note += f"; test-time shuffle on top of the training permutation ({trained_on})"
            if caveat:
                note += f"; {caveat}"
            out.per_image("accuracy", correct, setting=setting, note=note)
            out.per_image("accuracy_drop", clean[None, :] - correct, setting=setting, note=note + "; paired per image")
            if chance is not None:
                order_dependence_rows(out, clean, correct, chance, setting, inputs.seed, note)
            displacement = sum(mean_displacement(p, height, width) for p in permutations) / len(permutations)
            out.single("mean_displacement_px", displacement, setting=setting, note=note, n_images=0)
        equivariance_rows(inputs, out, clean_logits)

    def plot(self, tables: list[pd.DataFrame], out_dir: Path) -> list[Path]:
        return drawings.plot_permutations(tables, out_dir)

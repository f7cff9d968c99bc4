"""Pixel-permutation probe: how much does a trained model care where its pixels are?

Test-time shuffles of the natural image (before the model's own preparation, so a model
trained with `--permute-pixels` still gets its training permutation on top):

- `global`: one fixed random permutation of all H*W positions.
- `local-k`: pixels shuffled inside each k x k window (windows cut at the border are
  shuffled within themselves).
- `swaps-T-d`: T random swaps of pixel pairs at most d pixels apart (d = inf: any pair),
  applied one after the other to the test images. T is swept as fractions of H*W. This is
  robustness (a model trained on natural pixels, tested on swapped ones), not the PiT
  paper's pixel-swap experiment, which trains and tests on swapped pixels: that is a
  training option (`localitylab train ... --permute-pixels SEED --swaps T --swap-distance
  d`), and its number is the `clean` row of such a run, whose note names the permutation.
- `patch-shuffle-g`: the image cut into g x g tiles whose order is shuffled.

Every shuffle is a permutation `perm` of the flattened positions (out[p] = image[perm[p]]),
drawn from a seed derived from the probe's seed and the setting's name; the shuffles live in
`localitylab.data.permutation`, where `permutation_for_setting(setting, height, width,
seed)` rebuilds one exactly; the seed is in each row's `note`.

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

import copy
import math
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
import torch.nn as nn
from pydantic import field_validator, model_validator

from localitylab.data.permutation import (distance_label, global_permutation, mean_displacement, parse_distance,
                                          permutation_for_setting, permute_pixels, setting_seed, tile_permutation)
from localitylab.errors import UserError
from localitylab.probes.base import Measurements, Probe, ProbeInputs, SummaryColumn, overlay
from localitylab.probes.registry import register_probe
from localitylab.probes.target import ProbeTarget
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
        raise UserError(f"--opt {key}: expected a number or a list of numbers, got {value!r} ({err})") from None


def shuffle_settings(height: int, width: int, options: dict[str, Any]) -> list[str]:
    """The test-time shuffles to run on an image of this size, as table settings."""
    windows = _number_list(options, "window_sizes", DEFAULT_WINDOW_SIZES, int)
    grids = _number_list(options, "tile_grids", DEFAULT_TILE_GRIDS, int)
    fractions = _number_list(options, "swap_fractions", DEFAULT_SWAP_FRACTIONS, float)
    distances = _number_list(options, "swap_distances", DEFAULT_SWAP_DISTANCES, parse_distance)
    if any(w < 2 for w in windows) or any(g < 2 for g in grids) or any(f < 0 for f in fractions):
        raise UserError("--opt window_sizes and tile_grids must be >= 2, swap_fractions >= 0")
    settings = ["global"]
    # A window as large as the image is the global shuffle again.
    settings += [f"local-{k}" for k in windows if k < min(height, width)]
    for distance in distances:
        for fraction in fractions:
            settings.append(f"swaps-{round(fraction * height * width)}-{distance_label(distance)}")
    settings += [f"patch-shuffle-{g}" for g in grids if height % g == 0 and width % g == 0 and g <= min(height, width)]
    return list(dict.fromkeys(settings))


# --- equivariance -------------------------------------------------------------------------

def permuted_position_copy(model: nn.Module, token_permutation: torch.Tensor) -> nn.Module:
    """A copy of a timm ViT whose position-embedding row t is the original row token_permutation[t]."""
    twin = copy.deepcopy(model)
    prefix = 0 if getattr(twin, "no_embed_class", False) else int(getattr(twin, "num_prefix_tokens", 0))
    with torch.no_grad():
        rows = twin.pos_embed[:, prefix:]
        twin.pos_embed[:, prefix:] = rows[:, token_permutation.to(rows.device)]
    return twin


# Module classes and attributes that carry position outside the absolute table.
POSITION_MARKERS = {
    "rotary position embedding": ("rope", "rotary", "rot_pos"),
    "relative position bias": ("relative_position", "rel_pos", "relpos"),
    "window attention": ("window",),
    "gated positional self-attention": ("gpsa", "rel_indices"),
}


def position_outside_table(model: nn.Module) -> str | None:
    """Why a permutation of the embedding rows cannot move all of `model`'s position
    information, or None when the absolute table holds all of it (a plain ViT)."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "backbone", None) is not None:
        return "a convolutional stem (hybrid ViT) sees pixel positions before the embedding"
    for name, module in model.named_modules():
        words = (type(module).__name__.lower(), *(attr.lower() for attr in vars(module)),
                 *(n.lower() for n, _ in module.named_parameters(recurse=False)),
                 *(n.lower() for n, _ in module.named_buffers(recurse=False)))
        for what, markers in POSITION_MARKERS.items():
            if any(marker in word for marker in markers for word in words) and not _unused(module, markers):
                return f"{what} ({type(module).__name__} at {name or 'the model'}) is not in the permuted table"
        if isinstance(module, nn.Conv2d) and module is not getattr(patch_embed, "proj", None):
            return f"a convolution over the token grid ({name}) sees neighbouring tokens"
        if isinstance(module, nn.Conv2d) and (tuple(module.kernel_size) != tuple(module.stride) or
                                              any(p != 0 for p in _pair(module.padding))):
            return f"the patch embedding ({name}) overlaps or pads, so it sees pixel positions"
    return None


def _unused(module: nn.Module, markers: tuple[str, ...]) -> bool:
    """Attributes such as `rope = None` name a feature the module does not use."""
    for attr, value in vars(module).items():
        if any(marker in attr.lower() for marker in markers) and value is None:
            return True
    return False


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def permutable_embedding(model: nn.Module) -> tuple[int, int, int] | None:
    """(patch size, grid rows, grid cols) when the model has one absolute embedding row per
    token that a permutation can move, else None."""
    from localitylab.models.describe import describe_model

    pos_embed = getattr(model, "pos_embed", None)
    if not isinstance(pos_embed, torch.Tensor) or getattr(model, "dynamic_img_size", False):
        return None
    info = describe_model(model)  # the token spacing (a hybrid's is its backbone's stride), decided there
    if info.grid is None or not isinstance(info.patch_size, int):
        return None
    (grid_h, grid_w), patch = info.grid, info.patch_size
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 0))
    if pos_embed.ndim != 3 or pos_embed.shape[1] != prefix + grid_h * grid_w:
        return None
    return patch, grid_h, grid_w


@torch.no_grad()
def logit_difference(reference: nn.Module, candidate: nn.Module, inputs: torch.Tensor, permutation: torch.Tensor,
                     batch_size: int) -> tuple[float, float]:
    """(max |candidate(permute(x)) - reference(x)|, relative Frobenius error) over `inputs`."""
    max_abs, diff_sq, ref_sq = 0.0, 0.0, 0.0
    permutation = permutation.to(inputs.device)
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start:start + batch_size]
        expected = reference(batch).double()
        got = candidate(permute_pixels(batch, permutation)).double()
        max_abs = max(max_abs, float((got - expected).abs().max()))
        diff_sq += float(((got - expected) ** 2).sum())
        ref_sq += float((expected**2).sum())
    return max_abs, math.sqrt(diff_sq) / max(math.sqrt(ref_sq), 1e-30)


def equivariance_rows(inputs: ProbeInputs, out: Measurements) -> None:
    """The certificate rows; pi acts on the model's input (after any training permutation)."""
    target = inputs.target
    model = target.model
    prepared = target.prepare(inputs.images)
    height, width = prepared.shape[-2:]

    def add(setting: str, permutation: torch.Tensor, candidate: nn.Module, note: str) -> None:
        max_abs, rel = logit_difference(model, candidate, prepared, permutation, inputs.batch_size)
        out.single("equivariance_max_abs", max_abs, setting=setting, note=note, n_images=inputs.n_images)
        out.single("equivariance_rel", rel, setting=setting, note=note, n_images=inputs.n_images)

    pixel_seed = setting_seed(inputs.seed, "equivariance-pixel")
    pixel_pi = global_permutation(height, width, pixel_seed)
    embedding = permutable_embedding(model)
    refusal = position_outside_table(model) if getattr(model, "patch_embed", None) is not None else None
    if refusal is not None:
        for metric in ("equivariance_max_abs", "equivariance_rel"):
            out.single(metric, None, setting="equivariance", n_images=0,
                       note=f"no certificate: {refusal}, so permuting the embedding rows cannot test equivariance")
    elif embedding is not None:
        patch, grid_h, grid_w = embedding
        if patch == 1:
            add("equivariance-pixel", pixel_pi, permuted_position_copy(model, pixel_pi),
                f"random pixel pi (seed={pixel_seed}), position-embedding rows permuted by the same pi")
        else:
            patch_seed = setting_seed(inputs.seed, "equivariance-patch")
            order = torch.randperm(grid_h * grid_w, generator=torch.Generator().manual_seed(patch_seed))
            add("equivariance-patch", tile_permutation(height, width, patch, patch, order),
                permuted_position_copy(model, order),
                f"pi moves whole {patch}x{patch} patches (seed={patch_seed}), embedding rows permuted alike")
            add("equivariance-pixel", pixel_pi, model,
                f"random pixel pi (seed={pixel_seed}) inside patches: no row permutation of a patch-{patch} "
                "embedding matches it, rows untouched; the error shows equivariance does not hold")
    note = (f"input pixels permuted alone (seed={pixel_seed}): "
            + ("no absolute position embedding to permute, so this is not a certificate"
               if embedding is None else "the position embedding is what tells pixels apart"))
    add("input-only", pixel_pi, model, note)


# --- the probe ------------------------------------------------------------------------------

class PermutationOptions(Settings):
    window_sizes: Any = DEFAULT_WINDOW_SIZES  # local-k windows
    tile_grids: Any = DEFAULT_TILE_GRIDS  # patch-shuffle-g grids
    swap_fractions: Any = DEFAULT_SWAP_FRACTIONS  # swap counts T as fractions of H*W
    swap_distances: Any = DEFAULT_SWAP_DISTANCES  # swap distances d in pixels ('inf': any pair)
    draws: int = DEFAULT_DRAWS  # permutations drawn per setting; the intervals cover draws and images

    @field_validator("draws", mode="before")
    @classmethod
    def _draws(cls, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--opt draws must be a whole number >= 1, got {value!r}")
        return value

    @model_validator(mode="after")
    def _values(self) -> "PermutationOptions":
        try:
            shuffle_settings(8, 8, self.shuffles())  # the values' checks do not depend on the image size
        except UserError as err:
            raise ValueError(str(err)) from None
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
def correct_per_image(inputs: ProbeInputs, permutation: torch.Tensor | None) -> torch.Tensor:
    """(N,) 1.0 where the model's prediction on the image, with its pixels moved by
    `permutation` before the model's own preparation, is its label."""
    model = inputs.target.model
    was_training = model.training
    model.eval()
    transform = None
    if permutation is not None:
        on_device = permutation.to(inputs.target.device)
        transform = lambda batch: permute_pixels(batch, on_device)  # noqa: E731
    correct = [(model(batch.inputs).argmax(-1) == batch.labels).double().cpu() for batch in inputs.batches(transform)]
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
    denoiser_reason = ("it measures class accuracy; for generation, train with --permute-pixels and compare "
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
        clean = correct_per_image(inputs, None)
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
            displacement = sum(mean_displacement(p, height, width) for p in permutations) / len(permutations)
            out.single("mean_displacement_px", displacement, setting=setting, note=note, n_images=0)
        equivariance_rows(inputs, out)

    def plot(self, tables: list[pd.DataFrame], out_dir: Path) -> list[Path]:
        frame = overlay(tables)
        if frame is None or not frame["metric"].eq("accuracy").any():
            return []
        return [plot_permutation(frame, Path(out_dir) / "permutation.png")]


def _family(setting: str) -> str:
    if setting.startswith("swaps-"):
        return f"swaps, d={setting.rsplit('-', 1)[1]}"
    return setting.rsplit("-", 1)[0] if setting[-1].isdigit() else setting


def plot_permutation(frame: pd.DataFrame, path: Path) -> Path:
    """Left: accuracy against the number of test-time swaps T (one line per model and
    distance d). Right: accuracy against the mean pixel displacement of every shuffle,
    models overlaid. Bars: 95% intervals over images and permutation draws."""
    import matplotlib.pyplot as plt

    from localitylab.plotting import apply_style, errorbar, model_colours, save_figure

    apply_style()
    accuracy = frame[frame["metric"] == "accuracy"].set_index(["model", "setting"])
    displacement = frame[frame["metric"] == "mean_displacement_px"].set_index(["model", "setting"])["value"]
    models = sorted(frame["model"].unique())
    colours = model_colours(models)
    fig, (swaps_ax, strength_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    line_styles = ["-", "--", ":", "-."]
    family_markers = {"global": "X", "local": "s", "patch-shuffle": "^", "swaps": "o"}
    for model in models:
        colour = colours[model]
        rows = accuracy.loc[model]
        clean = rows.loc["clean", "value"] if "clean" in rows.index else None
        swaps = rows[rows.index.str.startswith("swaps-")]
        distances = sorted({s.rsplit("-", 1)[1] for s in swaps.index}, key=lambda d: math.inf if d == "inf" else float(d))
        for i, distance in enumerate(distances):
            sweep = swaps[swaps.index.str.endswith(f"-{distance}")].copy()
            sweep["swaps"] = [int(s.split("-")[1]) for s in sweep.index]
            if "clean" in rows.index:
                sweep = pd.concat([rows.loc[["clean"]].assign(swaps=0), sweep[sweep["swaps"] > 0]])
            sweep = sweep.sort_values("swaps")
            errorbar(swaps_ax, sweep["swaps"], sweep, color=colour, linestyle=line_styles[i % len(line_styles)],
                     marker="o", label=f"{model}, d={distance}")
        for family, marker in family_markers.items():
            points = rows[[(_family(s) == family or (family == "swaps" and s.startswith("swaps-")))
                           and (model, s) in displacement.index for s in rows.index]]
            if points.empty:
                continue
            x = [displacement[(model, s)] for s in points.index]
            order = sorted(range(len(x)), key=x.__getitem__)
            errorbar(strength_ax, [x[i] for i in order], points.iloc[order], color=colour, marker=marker,
                     linestyle="-" if family != "swaps" else "none", markersize=6 if family != "swaps" else 4,
                     alpha=1.0 if family != "swaps" else 0.7, label=f"{model}: {family}")
        if clean is not None:
            strength_ax.axhline(clean, color=colour, linewidth=0.8, alpha=0.5)
    swaps_ax.set_xscale("symlog", linthresh=1)
    swaps_ax.set(xlabel="pixel swaps T at test time", ylabel="test accuracy", title="Random swaps (bars: 95% CI)",
                 ylim=(0, 1.02))
    strength_ax.set(xlabel="mean pixel displacement (px)", ylabel="test accuracy",
                    title="Accuracy against shuffle strength", ylim=(0, 1.02))
    swaps_ax.legend(fontsize=7, loc="lower left")
    strength_ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return save_figure(fig, path)

"""Pixel-permutation probe: how much does a trained model care where its pixels are?

Test-time shuffles of the natural image (before the model's own preparation, so a model
trained with `--permute-pixels` still gets its training permutation on top):

- `global`: one fixed random permutation of all H*W positions.
- `local-k`: pixels shuffled inside each k x k window (windows cut at the border are
  shuffled within themselves).
- `swaps-T-d`: T random swaps of pixel pairs at most d pixels apart (d = inf: any pair),
  applied one after the other: the PiT paper's protocol. T is swept as fractions of H*W.
- `patch-shuffle-g`: the image cut into g x g tiles whose order is shuffled.

Every shuffle is a permutation `perm` of the flattened positions (out[p] = image[perm[p]],
as in `localitylab.data.permutation`), drawn from a seed derived from the probe's seed and
the setting's name. `permutation_for_setting(setting, height, width, seed)` rebuilds it
exactly; the seed is in each row's `note`.

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
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from localitylab.data.permutation import permute_pixels, random_permutation
from localitylab.errors import UserError
from localitylab.probes.base import Probe, ProbeContext, Row
from localitylab.probes.registry import register_probe
from localitylab.probes.target import ProbeTarget
from localitylab.train.evaluation import evaluate

DEFAULT_WINDOW_SIZES = (2, 4, 8)
DEFAULT_TILE_GRIDS = (2, 4)
# Swap counts as fractions of H*W: the PiT paper's T = 25K at 224x224 is about 0.5 H*W.
DEFAULT_SWAP_FRACTIONS = (0.125, 0.25, 0.5, 1.0, 2.0)
DEFAULT_SWAP_DISTANCES: tuple[float, ...] = (2.0, math.inf)


# --- permutations (pure functions of shape and seed: the record of what was done) ----------

def setting_seed(seed: int, setting: str) -> int:
    """The seed of one setting's permutation: stable across runs, machines and Python versions."""
    return zlib.crc32(f"{seed}:{setting}".encode()) & 0x7FFFFFFF


def identity_permutation(height: int, width: int) -> torch.Tensor:
    return torch.arange(height * width)


def global_permutation(height: int, width: int, seed: int) -> torch.Tensor:
    return random_permutation(height * width, seed)


def local_window_permutation(height: int, width: int, window: int, seed: int) -> torch.Tensor:
    """Shuffle pixels inside each window x window tile; no pixel leaves its tile."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    windows_per_row = -(-width // window)
    window_id = ((rows // window) * windows_per_row + cols // window).flatten().double()
    keys = torch.rand(height * width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    # Positions grouped by window in natural order, and the same groups in random order:
    # pairing them sends each position to a random position of its own window.
    natural = torch.argsort(window_id, stable=True)
    shuffled = torch.argsort(window_id + keys * 0.5)
    permutation = torch.empty(height * width, dtype=torch.long)
    permutation[natural] = shuffled
    return permutation


def tile_permutation(height: int, width: int, tile_h: int, tile_w: int, tile_order: torch.Tensor) -> torch.Tensor:
    """Move whole tile_h x tile_w tiles: output tile t shows input tile tile_order[t]."""
    grid_w = width // tile_w
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    tile = (rows // tile_h) * grid_w + cols // tile_w
    source = tile_order[tile]
    source_rows = (source // grid_w) * tile_h + rows % tile_h
    source_cols = (source % grid_w) * tile_w + cols % tile_w
    return (source_rows * width + source_cols).flatten()


def patch_shuffle_permutation(height: int, width: int, grid: int, seed: int) -> torch.Tensor:
    """Cut the image into grid x grid tiles and shuffle them (never the identity order)."""
    if height % grid or width % grid:
        raise UserError(f"patch-shuffle-{grid}: a {height}x{width} image cannot be cut into {grid}x{grid} tiles")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(grid * grid, generator=generator)
    while torch.equal(order, torch.arange(grid * grid)):  # a shuffle that moves nothing measures nothing
        order = torch.randperm(grid * grid, generator=generator)
    return tile_permutation(height, width, height // grid, width // grid, order)


def swap_permutation(height: int, width: int, swaps: int, max_distance: float, seed: int) -> torch.Tensor:
    """T random transpositions of pixel pairs at most `max_distance` pixels apart, composed in order.

    The first pixel of each pair is uniform over the image; the second is uniform over the
    other pixels within the distance (the disc clipped to the image)."""
    num_pixels = height * width
    permutation = np.arange(num_pixels)
    if swaps <= 0 or num_pixels < 2:
        return torch.from_numpy(permutation)
    rng = np.random.default_rng(seed)
    if math.isinf(max_distance):
        first = rng.integers(0, num_pixels, swaps)
        second = (first + rng.integers(1, num_pixels, swaps)) % num_pixels  # any other pixel, uniformly
    else:
        reach = int(math.floor(max_distance))
        dy, dx = np.meshgrid(np.arange(-reach, reach + 1), np.arange(-reach, reach + 1), indexing="ij")
        keep = (dy**2 + dx**2 <= max_distance**2) & ((dy != 0) | (dx != 0))
        offsets = np.stack([dy[keep], dx[keep]], axis=1)
        if len(offsets) == 0:
            raise UserError(f"swap distance {max_distance} reaches no other pixel; valid: >= 1 or inf")
        first_parts, second_parts, found = [], [], 0
        while found < swaps:  # rejection sampling: keep pairs whose partner is inside the image
            draw = max(2 * (swaps - found), 64)
            a = rng.integers(0, num_pixels, draw)
            offset = offsets[rng.integers(0, len(offsets), draw)]
            row, col = a // width + offset[:, 0], a % width + offset[:, 1]
            inside = (row >= 0) & (row < height) & (col >= 0) & (col < width)
            first_parts.append(a[inside])
            second_parts.append((row * width + col)[inside])
            found += int(inside.sum())
        first = np.concatenate(first_parts)[:swaps]
        second = np.concatenate(second_parts)[:swaps]
    for a, b in zip(first.tolist(), second.tolist()):  # order matters: swaps compose
        permutation[a], permutation[b] = permutation[b], permutation[a]
    return torch.from_numpy(permutation)


def permutation_for_setting(setting: str, height: int, width: int, seed: int) -> torch.Tensor:
    """The exact permutation behind a table row: `setting` as written in the table, `seed`
    as in its note (`seed=N`)."""
    family, _, arg = setting.partition("-")
    if setting == "clean":
        return identity_permutation(height, width)
    if setting == "global":
        return global_permutation(height, width, seed)
    if family == "local" and arg.isdigit():
        return local_window_permutation(height, width, int(arg), seed)
    if setting.startswith("patch-shuffle-") and setting.rsplit("-", 1)[1].isdigit():
        return patch_shuffle_permutation(height, width, int(setting.rsplit("-", 1)[1]), seed)
    if family == "swaps":
        count, _, distance = arg.partition("-")
        if count.isdigit() and distance:
            return swap_permutation(height, width, int(count), _parse_distance(distance), seed)
    raise UserError(f"unknown permutation setting {setting!r}; valid: clean, global, local-K, swaps-T-D, patch-shuffle-G")


def mean_displacement(permutation: torch.Tensor, height: int, width: int) -> float:
    """Mean distance in pixels between where a pixel was and where it lands: the shuffle's strength."""
    target = torch.arange(height * width)
    dy = (target // width - permutation // width).double()
    dx = (target % width - permutation % width).double()
    return float(torch.sqrt(dy**2 + dx**2).mean())


def _parse_distance(text: Any) -> float:
    if isinstance(text, str) and text.strip().lower() == "inf":
        return math.inf
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise UserError(f"swap distance {text!r} is not a number; valid: a number >= 1 or 'inf'") from None
    if not value >= 1:
        raise UserError(f"swap distance {text!r} reaches no other pixel; valid: a number >= 1 or 'inf'")
    return value


def _distance_label(distance: float) -> str:
    return "inf" if math.isinf(distance) else f"{distance:g}"


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
    distances = _number_list(options, "swap_distances", DEFAULT_SWAP_DISTANCES, _parse_distance)
    if any(w < 2 for w in windows) or any(g < 2 for g in grids) or any(f < 0 for f in fractions):
        raise UserError("--opt window_sizes and tile_grids must be >= 2, swap_fractions >= 0")
    settings = ["global"]
    # A window as large as the image is the global shuffle again.
    settings += [f"local-{k}" for k in windows if k < min(height, width)]
    for distance in distances:
        for fraction in fractions:
            settings.append(f"swaps-{round(fraction * height * width)}-{_distance_label(distance)}")
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


def permutable_embedding(model: nn.Module) -> tuple[int, int, int] | None:
    """(patch size, grid rows, grid cols) when the model has one absolute embedding row per
    token that a permutation can move, else None."""
    pos_embed = getattr(model, "pos_embed", None)
    patch_embed = getattr(model, "patch_embed", None)
    if not isinstance(pos_embed, torch.Tensor) or patch_embed is None or getattr(model, "dynamic_img_size", False):
        return None
    grid_h, grid_w = (int(g) for g in patch_embed.grid_size)
    patch = patch_embed.patch_size
    patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
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


def equivariance_rows(target: ProbeTarget, context: ProbeContext) -> list[Row]:
    """The certificate rows; pi acts on the model's input (after any training permutation)."""
    model = target.model
    inputs = target.prepare(context.images)
    height, width = inputs.shape[-2:]
    rows: list[Row] = []

    def add(setting: str, permutation: torch.Tensor, candidate: nn.Module, note: str) -> None:
        max_abs, rel = logit_difference(model, candidate, inputs, permutation, context.batch_size)
        rows.append(Row("equivariance_max_abs", max_abs, setting=setting, note=note))
        rows.append(Row("equivariance_rel", rel, setting=setting, note=note))

    pixel_seed = setting_seed(context.seed, "equivariance-pixel")
    pixel_pi = global_permutation(height, width, pixel_seed)
    embedding = permutable_embedding(model)
    if embedding is not None:
        patch, grid_h, grid_w = embedding
        if patch == 1:
            add("equivariance-pixel", pixel_pi, permuted_position_copy(model, pixel_pi),
                f"random pixel pi (seed={pixel_seed}), position-embedding rows permuted by the same pi")
        else:
            patch_seed = setting_seed(context.seed, "equivariance-patch")
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
    return rows


# --- the probe ------------------------------------------------------------------------------

@register_probe
class PermutationProbe(Probe):
    name = "permutation"
    summary = ("Accuracy under test-time pixel shuffles (global, local-k, swaps-T-d, patch-shuffle-g) "
               "and the position-embedding equivariance certificate")
    applies_to = "every model (accuracies mean most for a trained classifier)"
    option_names = ("window_sizes", "tile_grids", "swap_fractions", "swap_distances")

    def check_options(self, options: dict[str, Any]) -> None:
        shuffle_settings(8, 8, options)  # the values' checks do not depend on the image size

    def measure(self, target: ProbeTarget, context: ProbeContext) -> list[Row]:
        height, width = context.images.shape[-2:]
        settings = shuffle_settings(height, width, context.options)
        caveat = "" if target.checkpoint else "untrained model: accuracies are near chance"
        if "mae_options" in target.extras:
            caveat = "MAE encoder: its classifier head is untrained, so accuracies are near chance"
        clean = self.accuracy(target, context, None)
        rows = [Row("accuracy", clean, setting="clean", note=caveat)]
        for setting in settings:
            seed = setting_seed(context.seed, setting)
            permutation = permutation_for_setting(setting, height, width, seed)
            accuracy = self.accuracy(target, context, permutation)
            note = f"seed={seed}; permutation_for_setting({setting!r}, {height}, {width}, {seed})"
            if caveat:
                note += f"; {caveat}"
            rows += [
                Row("accuracy", accuracy, setting=setting, note=note),
                Row("accuracy_drop", clean - accuracy, setting=setting, note=note),
                Row("mean_displacement_px", mean_displacement(permutation, height, width), setting=setting, note=note),
            ]
        return rows + equivariance_rows(target, context)

    @staticmethod
    def accuracy(target: ProbeTarget, context: ProbeContext, permutation: torch.Tensor | None) -> float:
        transform = None
        if permutation is not None:
            on_device = permutation.to(target.device)
            transform = lambda batch: permute_pixels(batch, on_device)  # noqa: E731
        result = evaluate(target.model, target.data, context.images, context.labels, context.batch_size,
                          amp=False, transform=transform)
        return result["accuracy"]

    def plot(self, tables: list[pd.DataFrame], out_dir: Path) -> list[Path]:
        frame = overlay_tables(tables)
        if frame.empty or not frame["metric"].eq("accuracy").any():
            return []
        return [plot_permutation(frame, Path(out_dir) / "permutation.png")]


def overlay_tables(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """One frame from several tables; a model name met in more than one table gets a
    ' #k' suffix there, so two runs of one model stay two lines."""
    seen: dict[str, int] = {}
    frames = []
    for table in tables:
        table = table.copy()
        renames = {}
        for model in table["model"].unique():
            count = seen.get(model, 0)
            seen[model] = count + 1
            if count:
                renames[model] = f"{model} #{count + 1}"
        frames.append(table.replace({"model": renames}) if renames else table)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["model", "metric", "value"])


def _family(setting: str) -> str:
    if setting.startswith("swaps-"):
        return f"swaps, d={setting.rsplit('-', 1)[1]}"
    return setting.rsplit("-", 1)[0] if setting[-1].isdigit() else setting


def plot_permutation(frame: pd.DataFrame, path: Path) -> Path:
    """Left: accuracy against the number of swaps T (one line per model and distance d).
    Right: accuracy against the mean pixel displacement of every shuffle, models overlaid."""
    import matplotlib.pyplot as plt

    from localitylab.plotting import apply_style, model_colours, save_figure

    apply_style()
    frame = frame[frame["value"].notna()]
    accuracy = frame[frame["metric"] == "accuracy"].set_index(["model", "setting"])["value"]
    displacement = frame[frame["metric"] == "mean_displacement_px"].set_index(["model", "setting"])["value"]
    models = sorted(frame["model"].unique())
    colours = model_colours(models)
    fig, (swaps_ax, strength_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    line_styles = ["-", "--", ":", "-."]
    family_markers = {"global": "X", "local": "s", "patch-shuffle": "^"}
    for model in models:
        colour = colours[model]
        clean = accuracy.get((model, "clean"))
        settings = [s for (m, s) in accuracy.index if m == model and s != "clean"]
        distances = sorted({s.rsplit("-", 1)[1] for s in settings if s.startswith("swaps-")},
                           key=lambda d: math.inf if d == "inf" else float(d))
        for i, distance in enumerate(distances):
            sweep = sorted((int(s.split("-")[1]), accuracy[(model, s)]) for s in settings
                           if s.startswith("swaps-") and s.rsplit("-", 1)[1] == distance)
            if clean is not None:
                sweep = [(0, clean)] + [p for p in sweep if p[0] > 0]
            swaps_ax.plot([t for t, _ in sweep], [a for _, a in sweep], line_styles[i % len(line_styles)],
                          marker="o", color=colour, label=f"{model}, d={distance}")
        for family, marker in family_markers.items():
            points = sorted((displacement[(model, s)], accuracy[(model, s)]) for s in settings
                            if _family(s) == family and (model, s) in displacement.index)
            if points:
                strength_ax.plot([x for x, _ in points], [y for _, y in points], "-", marker=marker, color=colour,
                                 label=f"{model}: {family}", markersize=7)
        swap_points = sorted((displacement[(model, s)], accuracy[(model, s)]) for s in settings
                             if s.startswith("swaps-") and (model, s) in displacement.index)
        if swap_points:
            strength_ax.scatter([x for x, _ in swap_points], [y for _, y in swap_points], color=colour, marker="o",
                                s=14, alpha=0.7, label=f"{model}: swaps")
        if clean is not None:
            strength_ax.axhline(clean, color=colour, linewidth=0.8, alpha=0.5)
    swaps_ax.set_xscale("symlog", linthresh=1)
    swaps_ax.set(xlabel="pixel swaps T", ylabel="test accuracy", title="Random swaps (PiT protocol)", ylim=(0, 1.02))
    strength_ax.set(xlabel="mean pixel displacement (px)", ylabel="test accuracy",
                    title="Accuracy against shuffle strength", ylim=(0, 1.02))
    swaps_ax.legend(fontsize=7, loc="lower left")
    strength_ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return save_figure(fig, path)

"""mae-reconstruction: how well an MAE-pre-trained model fills in what it did not see.

Applies to MAE checkpoints only (`mae_options` and `mae_state` beside the encoder's
`model_state`; see localitylab/models/mae.py): the probe rebuilds the autoencoder around
the loaded encoder and, on the probe images (prepared as the model was trained: the
recorded pixel permutation, then normalisation), draws `mask_draws` independent sets of
masks at the trained mask ratio (option `mask_ratio` overrides it), seeds seed, seed+1, ...

Rows, per draw (setting `ratio-R-seed-S`) and averaged over draws (setting `ratio-R`):

- `masked_mse`: the MAE loss, the mean squared error over masked tokens, in the model's
  input space (per-channel standardised pixels; per-token normalised with norm_pix_loss).
- `mean_baseline_mse`: the same error for predicting zero everywhere: the data set's mean
  colour (with norm_pix_loss: each token's own mean).
- `relative_mse`: masked_mse / mean_baseline_mse (1 = no better than the mean colour).

Figure (`artifacts`, needs the model): for a few probe images, the masked input (masked
pixels in a flat blue-grey), the reconstruction with the visible pixels pasted back, and
the original, in pixel space (and un-permuted, for a model trained on permuted pixels).
`plot` draws relative_mse per model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from localitylab.errors import UserError
from localitylab.probes.base import Probe, ProbeContext, Row
from localitylab.probes.registry import register_probe
from localitylab.probes.target import ProbeTarget

DEFAULT_MASK_DRAWS = 3
DEFAULT_FIGURE_IMAGES = 8
MASK_COLOUR = (0.62, 0.68, 0.78)  # the masked pixels in the figure: a blue-grey no image pixel is likely to match
METRICS = ("masked_mse", "mean_baseline_mse", "relative_mse")


def mae_reason(target: ProbeTarget) -> str | None:
    from localitylab.models.mae import MAE_KINDS

    extras = target.extras
    if not (isinstance(extras.get("mae_options"), dict) and isinstance(extras.get("mae_state"), dict)):
        return ("not an MAE checkpoint (no mae_options / mae_state), so mae-reconstruction does not apply: "
                "it needs a model pre-trained as a masked autoencoder")
    if target.kind not in MAE_KINDS:
        return (f"MAE needs a transformer (pit-* or vit-*/P) and {target.spec.name} is a {target.kind} model, "
                f"so mae-reconstruction does not apply")
    return None


def build_target_mae(target: ProbeTarget, mask_ratio: float | None = None):
    """The checkpoint's MAE around `target.model` (eval mode), optionally at another mask ratio."""
    from localitylab.models.mae import check_mask_ratio, mae_from_encoder

    mae = mae_from_encoder(target.model, target.extras["mae_options"], target.extras["mae_state"]).eval()
    if mask_ratio is not None:
        check_mask_ratio(mask_ratio, mae.num_tokens)
        mae.mask_ratio = float(mask_ratio)
    return mae


def _int_option(context: ProbeContext, key: str, default: int, minimum: int) -> int:
    value = context.option(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"--opt {key} must be a whole number >= {minimum}, got {value!r}")
    return value


def _mask_ratio_option(context: ProbeContext) -> float | None:
    value = context.option("mask_ratio", None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"--opt mask_ratio must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


@torch.no_grad()
def reconstruction_errors(mae, target: ProbeTarget, images: torch.Tensor, batch_size: int,
                          seed: int) -> tuple[float, float]:
    """(masked_mse, mean_baseline_mse) over `images` (uint8) with masks drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    error_sum = baseline_sum = 0.0
    count = 0
    for start in range(0, len(images), batch_size):
        inputs = target.prepare(images[start:start + batch_size])
        output = mae(inputs, generator)
        targets = mae.target(inputs).float()
        mask = output.mask
        error_sum += (output.pred.float() - targets).pow(2).mean(dim=-1)[mask].sum().item()
        baseline_sum += targets.pow(2).mean(dim=-1)[mask].sum().item()
        count += int(mask.sum())
    return error_sum / count, baseline_sum / count


@register_probe
class MaeReconstruction(Probe):
    name = "mae-reconstruction"
    summary = ("MAE checkpoints: mean squared error of the masked-token reconstruction at the trained mask ratio, "
               "against predicting the mean colour; masked input / reconstruction / original figure")
    applies_to = "MAE-pre-trained pit-* and vit-*/P checkpoints"
    option_names = ("mask_draws", "mask_ratio", "figure_images")

    def not_applicable(self, target: ProbeTarget) -> str | None:
        return mae_reason(target)

    def measure(self, target: ProbeTarget, context: ProbeContext) -> list[Row]:
        from localitylab.models.mae import mask_ratio_note

        draws = _int_option(context, "mask_draws", DEFAULT_MASK_DRAWS, 1)
        _int_option(context, "figure_images", DEFAULT_FIGURE_IMAGES, 1)
        mae = build_target_mae(target, _mask_ratio_option(context))
        targets = "per-token normalised pixels (norm_pix_loss)" if mae.norm_pix_loss else "normalised pixels"
        base_note = f"{mask_ratio_note(mae)}; targets: {targets}"
        if target.data.permutation is not None:
            base_note += "; on the model's permuted pixels"
        rows: list[Row] = []
        errors, baselines = [], []
        for draw in range(draws):
            seed = context.seed + draw
            error, baseline = reconstruction_errors(mae, target, context.images, context.batch_size, seed)
            errors.append(error)
            baselines.append(baseline)
            setting = f"ratio-{mae.mask_ratio:g}-seed-{seed}"
            note = f"{base_note}; masks from torch.Generator().manual_seed({seed})"
            rows += [Row("masked_mse", error, setting=setting, note=note),
                     Row("mean_baseline_mse", baseline, setting=setting, note=note),
                     Row("relative_mse", error / baseline if baseline > 0 else None, setting=setting, note=note)]
        mean_error, mean_baseline = float(np.mean(errors)), float(np.mean(baselines))
        spread = f"; std over draws {np.std(errors):.3g}" if draws > 1 else ""
        seeds = f"seed {context.seed}" if draws == 1 else f"seeds {context.seed}..{context.seed + draws - 1}"
        note = f"mean over {draws} mask draw{'s' if draws > 1 else ''} ({seeds})"
        setting = f"ratio-{mae.mask_ratio:g}"
        rows += [Row("masked_mse", mean_error, setting=setting, note=note + spread),
                 Row("mean_baseline_mse", mean_baseline, setting=setting, note=note),
                 Row("relative_mse", mean_error / mean_baseline if mean_baseline > 0 else None, setting=setting,
                     note=note)]
        return rows

    def artifacts(self, target: ProbeTarget, context: ProbeContext, out_dir: Path) -> list[Path]:
        """Masked input, reconstruction and original for the first few probe images."""
        import matplotlib.pyplot as plt

        from localitylab.data.permutation import invert_permutation, permute_pixels
        from localitylab.plotting import apply_style, save_figure

        count = min(_int_option(context, "figure_images", DEFAULT_FIGURE_IMAGES, 1), context.n_images)
        mae = build_target_mae(target, _mask_ratio_option(context))
        inputs = target.prepare(context.images[:count])
        result = mae.reconstruct(inputs, torch.Generator().manual_seed(context.seed))
        mean = torch.tensor(target.data.mean, device=inputs.device).view(1, -1, 1, 1)
        std = torch.tensor(target.data.std, device=inputs.device).view(1, -1, 1, 1)

        def to_pixels(images: torch.Tensor) -> torch.Tensor:
            pixels = (images.float() * std + mean).clamp(0, 1)
            return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels[:, :3]

        masked = to_pixels(result.masked_input)
        colour = torch.tensor(MASK_COLOUR, device=masked.device).view(1, 3, 1, 1).expand_as(masked)
        masked = torch.where(result.pixel_mask.expand_as(masked), colour, masked)
        panels = [masked, to_pixels(result.reconstruction), to_pixels(result.original)]
        unpermuted = target.data.permutation is not None
        if unpermuted:
            inverse = invert_permutation(target.data.permutation.to(inputs.device))
            panels = [permute_pixels(p, inverse) for p in panels]
        labels = ("masked input", "reconstruction", "original")

        apply_style()
        size = 1.3
        fig, axes = plt.subplots(3, count, figsize=(size * count + 1.4, size * 3 + 0.6), squeeze=False,
                                 gridspec_kw={"wspace": 0.04, "hspace": 0.04})
        for row, (label, panel) in enumerate(zip(labels, panels)):
            for col in range(count):
                ax = axes[row][col]
                ax.imshow(panel[col].permute(1, 2, 0).cpu().numpy(), interpolation="nearest", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
                if col == 0:
                    ax.set_ylabel(label, fontsize="small")
        title = (f"{target.display_name}: MAE reconstruction, {round(mae.mask_ratio * 100):g}% of tokens masked "
                 f"(seed {context.seed})")
        if unpermuted:
            title += ", shown un-permuted"
        fig.suptitle(title, fontsize="medium")
        return [save_figure(fig, Path(out_dir) / "mae-reconstruction.png")]

    def plot(self, tables: list[pd.DataFrame], out_dir: Path) -> list[Path]:
        """relative_mse (averaged over mask draws) per model."""
        import matplotlib.pyplot as plt
        import seaborn as sns

        from localitylab.plotting import apply_style, model_colours, save_figure

        frame = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
        if frame.empty:
            return []
        frame = frame[(frame["metric"] == "relative_mse") & frame["value"].notna()
                      & ~frame["setting"].astype(str).str.contains("-seed-")]
        if frame.empty:
            return []
        apply_style()
        fig, ax = plt.subplots(figsize=(5.5, 1.2 + 0.45 * frame["model"].nunique()))
        sns.barplot(data=frame, y="model", x="value", hue="model", palette=model_colours(frame["model"]),
                    legend=False, ax=ax)
        ax.axvline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set(xlabel="masked-token MSE / MSE of the mean colour (lower is better)", ylabel="",
               title="MAE reconstruction of masked tokens")
        return [save_figure(fig, Path(out_dir) / "mae-reconstruction-relative-mse.png")]

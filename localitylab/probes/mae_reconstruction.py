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

Figure (from the same pass): for a few probe images, the masked input (masked
pixels in a flat blue-grey), the reconstruction with the visible pixels pasted back, and
the original, in pixel space (and un-permuted, for a model trained on permuted pixels).
`plot` draws relative_mse per model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pydantic import ValidationInfo, field_validator

from localitylab.probes.base import Measurements, Probe, ProbeInputs
from localitylab.plotting import probes as drawings
from localitylab.probes.registry import register_probe
from localitylab.probes.target import ProbeTarget
from localitylab.probes.settings import option
from localitylab.settings import Settings

DEFAULT_MASK_DRAWS = 3
DEFAULT_FIGURE_IMAGES = 8
MASK_COLOUR = (0.62, 0.68, 0.78)  # the masked pixels in the figure: a blue-grey no image pixel is likely to match
METRICS = ("masked_mse", "mean_baseline_mse", "relative_mse")


def _relative(out: Measurements, error: torch.Tensor, baseline: torch.Tensor, setting: str, note: str) -> None:
    """relative_mse: mean error / mean baseline over the images, a ratio of means whose
    interval comes from resampling the images."""
    errors, baselines = error.double().numpy(), baseline.double().numpy()
    value = errors.mean() / baselines.mean() if baselines.mean() > 0 else None

    def resample(indices: np.ndarray) -> np.ndarray:
        return (errors[indices].mean(axis=-1) / baselines[indices].mean(axis=-1))[None]

    out.statistics([dict(metric="relative_mse", value=value, setting=setting, note=note)], resample, len(errors))


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


class MaeReconstructionOptions(Settings):
    mask_draws: int = option(DEFAULT_MASK_DRAWS, "mae-reconstruction: independent sets of masks (seeds seed, "
                             "seed+1, ...).")
    mask_ratio: float | None = option(None, "mae-reconstruction: share of tokens masked (default: the ratio the "
                                      "model was trained with).")
    figure_images: int = option(DEFAULT_FIGURE_IMAGES, "mae-reconstruction: images in the figure.")

    @field_validator("mask_draws", "figure_images", mode="before")
    @classmethod
    def _whole(cls, value: Any, info: ValidationInfo) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{info.field_name} must be a whole number >= 1, got {value!r}")
        return value

    @field_validator("mask_ratio", mode="before")
    @classmethod
    def _ratio(cls, value: Any) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"mask_ratio must be a number strictly between 0 and 1, got {value!r}")
        return float(value)


@torch.no_grad()
def reconstruction_errors(mae, inputs: ProbeInputs, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image (N,): the masked-token MSE and the MSE of predicting zero (the mean colour),
    with masks drawn from `seed`. Every image has the same number of masked tokens."""
    generator = torch.Generator().manual_seed(seed)
    errors, baselines = [], []
    for batch in inputs.batches():
        output = mae(batch.inputs, generator)
        targets = mae.target(batch.inputs).float()
        mask = output.mask.float()
        count = mask.sum(dim=1)
        errors.append(((output.pred.float() - targets).pow(2).mean(dim=-1) * mask).sum(dim=1).double().cpu()
                      / count.double().cpu())
        baselines.append((targets.pow(2).mean(dim=-1) * mask).sum(dim=1).double().cpu() / count.double().cpu())
    return torch.cat(errors), torch.cat(baselines)


@dataclass
class ReconstructionPanels:
    """What the figure draws: masked input, reconstruction and original, in pixel space."""

    panels: list[torch.Tensor]  # three (n, 3, H, W) tensors in [0, 1]
    mask_ratio: float
    seed: int
    unpermuted: bool


@register_probe
class MaeReconstruction(Probe):
    name = "mae-reconstruction"
    summary = ("MAE checkpoints: mean squared error of the masked-token reconstruction at the trained mask ratio, "
               "against predicting the mean colour; masked input / reconstruction / original figure")
    applies_to = "MAE-pre-trained pit-* and vit-*/P checkpoints"
    Options = MaeReconstructionOptions
    denoiser_reason = "it reconstructs masked pixels with an MAE-pretrained pit-* or vit-*/P encoder"

    def not_applicable(self, target: ProbeTarget) -> str | None:
        return super().not_applicable(target) or mae_reason(target)

    def measure(self, inputs: ProbeInputs, out: Measurements) -> ReconstructionPanels:
        from localitylab.models.mae import mask_ratio_note

        target, options = inputs.target, inputs.options
        draws = options.mask_draws
        mae = build_target_mae(target, options.mask_ratio)
        targets = "per-token normalised pixels (norm_pix_loss)" if mae.norm_pix_loss else "normalised pixels"
        base_note = f"{mask_ratio_note(mae)}; targets: {targets}"
        if target.data.permutation is not None:
            base_note += "; on the model's permuted pixels"
        errors, baselines = [], []
        for draw in range(draws):
            seed = inputs.seed + draw
            error, baseline = reconstruction_errors(mae, inputs, seed)
            errors.append(error)
            baselines.append(baseline)
            setting = f"ratio-{mae.mask_ratio:g}-seed-{seed}"
            note = f"{base_note}; masks from torch.Generator().manual_seed({seed})"
            out.per_image("masked_mse", error, setting=setting, note=note)
            out.per_image("mean_baseline_mse", baseline, setting=setting, note=note)
            _relative(out, error, baseline, setting, note)
        per_draw = [float(e.mean()) for e in errors]
        spread = f"; std over draws {np.std(per_draw):.3g}" if draws > 1 else ""
        seeds = f"seed {inputs.seed}" if draws == 1 else f"seeds {inputs.seed}..{inputs.seed + draws - 1}"
        note = f"mean over {draws} mask draw{'s' if draws > 1 else ''} ({seeds})"
        setting = f"ratio-{mae.mask_ratio:g}"
        error, baseline = torch.stack(errors).mean(0), torch.stack(baselines).mean(0)
        out.per_image("masked_mse", error, setting=setting, note=note + spread)
        out.per_image("mean_baseline_mse", baseline, setting=setting, note=note)
        _relative(out, error, baseline, setting, note)
        return self.reconstruction(inputs, mae)

    @staticmethod
    def reconstruction(inputs: ProbeInputs, mae) -> ReconstructionPanels:
        """Masked input, reconstruction and original of the first few probe images, in pixel space."""
        from localitylab.data.permutation import invert_permutation, permute_pixels

        target = inputs.target
        count = min(inputs.options.figure_images, inputs.n_images)
        prepared = target.prepare(inputs.images[:count])
        with torch.no_grad():
            result = mae.reconstruct(prepared, torch.Generator().manual_seed(inputs.seed))
        mean = torch.tensor(target.data.mean, device=prepared.device).view(1, -1, 1, 1)
        std = torch.tensor(target.data.std, device=prepared.device).view(1, -1, 1, 1)

        def to_pixels(images: torch.Tensor) -> torch.Tensor:
            pixels = (images.float() * std + mean).clamp(0, 1)
            return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels[:, :3]

        masked = to_pixels(result.masked_input)
        colour = torch.tensor(MASK_COLOUR, device=masked.device).view(1, 3, 1, 1).expand_as(masked)
        masked = torch.where(result.pixel_mask.expand_as(masked), colour, masked)
        panels = [masked, to_pixels(result.reconstruction), to_pixels(result.original)]
        unpermuted = target.data.permutation is not None
        if unpermuted:
            inverse = invert_permutation(target.data.permutation.to(prepared.device))
            panels = [permute_pixels(panel, inverse) for panel in panels]
        return ReconstructionPanels([panel.cpu() for panel in panels], mae.mask_ratio, inputs.seed, unpermuted)

    def figures(self, target: ProbeTarget, drawing: ReconstructionPanels, out_dir: Path) -> list[Path]:
        return drawings.mae_reconstruction_figures(target, drawing, out_dir)

    def plot(self, tables: list[pd.DataFrame], out_dir: Path) -> list[Path]:
        return drawings.plot_mae_reconstruction(tables, out_dir)

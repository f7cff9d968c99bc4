"""Order dependence (docs/probes.md, permutation): the share of the headroom above chance
that a test-time pixel shuffle removes, (clean - altered) / (clean - chance), chance =
1 / classes. A ratio of means, so a statistic of the images: its paired interval resamples
the images (the same ones for the clean and the altered accuracy) and the setting's draws.
"""

from __future__ import annotations

import numpy as np
import torch

from localitylab.data.permutation import setting_seed
from localitylab.probes.measurements import Measurements


def order_dependence_resampler(clean: np.ndarray, altered: np.ndarray, chance: float, seed: int):
    """For the bootstrap: (clean - altered) / (clean - chance) on resampled images, paired
    (the same images for clean and altered), with the draws (rows of `altered`, (draws, n))
    resampled too, from a generator seeded by `seed`."""
    draws = altered.shape[0]
    rng = np.random.default_rng(seed)

    def resample(indices: np.ndarray) -> np.ndarray:
        indices = np.atleast_2d(indices)
        count, size = indices.shape
        weights = np.zeros((count, clean.shape[0]))
        np.add.at(weights, (np.arange(count)[:, None], indices), 1.0 / size)
        clean_mean = weights @ clean  # (B,)
        per_draw = weights @ altered.T  # (B, draws)
        chosen = rng.integers(0, draws, size=(count, draws)) if draws > 1 else np.zeros((count, 1), dtype=int)
        altered_mean = np.take_along_axis(per_draw, chosen, axis=1).mean(axis=1)
        headroom = clean_mean - chance
        with np.errstate(divide="ignore", invalid="ignore"):
            return ((clean_mean - altered_mean) / np.where(headroom != 0, headroom, np.nan))[None, :]

    return resample


def order_dependence_rows(out: Measurements, clean: torch.Tensor, altered: torch.Tensor, chance: float,
                          setting: str, seed: int, note: str) -> None:
    """The `order_dependence` row of one setting (docs/probes.md, permutation): a statistic
    of the images (a ratio of means) with its paired interval; emptied, with a note, once the
    intervals exist if the clean accuracy's interval includes chance."""
    clean_np = clean.double().numpy()
    altered_np = altered.double().numpy().reshape(-1, clean_np.shape[0])
    headroom = clean_np.mean() - chance
    value = (clean_np.mean() - altered_np.mean()) / headroom if headroom != 0 else None
    resample = order_dependence_resampler(clean_np, altered_np, chance, setting_seed(seed, f"{setting}#bootstrap"))
    out.statistics([dict(metric="order_dependence", value=value, setting=setting,
                         note=f"{note}; (clean - altered) / (clean - chance), chance = {chance:.4g}")],
                   resample, clean_np.shape[0])
    row = out.rows[-1]
    clean_row = next(r for r in out.rows if r.metric == "accuracy" and r.setting == out._setting("clean"))

    def check() -> None:
        low, high = clean_row.interval or (None, None)
        if low is not None and low <= chance <= high:
            row.single, row.interval = None, None
            row.note = (f"clean accuracy {clean_row.value:.3g} [{low:.3g}, {high:.3g}] includes chance "
                        f"({chance:.3g}): no headroom to lose, so no order dependence")

    out.checks.append(check)

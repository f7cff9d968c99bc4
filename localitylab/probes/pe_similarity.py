"""pe-similarity: does the learned position embedding encode the 2-D grid? (docs/probes.md)

Reads only the table P (one row per non-prefix token; timm puts the prefix rows first
unless `no_embed_class`), never images, so every row has n_images = 0 and no interval: a
property of the weights (studies give its spread over training seeds). Each row's note
gives the score of a fixed 2-D sin-cos table on the same grid, the scale to read it against
(a perfect table scores 0.99 on 8x8 but about 0.5 on 1x32).

- `pe_distance_spearman`: Spearman correlation of the cosine similarity S[i, j] with
  -|c_i - c_j| over pairs i < j (a fixed-seed sample of MAX_PAIRS pairs when there are
  more), so a table whose similarity falls with distance scores near 1.
- `pe_topology_r2`: a 2-D metric MDS (SMACOF, started from classical MDS) of the cosine
  dissimilarity 1 - S, aligned to the true token centres by Procrustes; 1 - disparity.
  Metric MDS rather than Isomap or a spectral embedding because it needs no neighbour
  graph: random or half-trained tables give disconnected k-NN graphs, where those methods
  warn and return arbitrary layouts. Starting from classical MDS makes it deterministic.
  On sin-cos tables it scores 0.98-0.99 (8x8 and 32x32 grids), against 0.90-0.97 for
  classical MDS alone. At most MAX_TOPOLOGY_ROWS rows (a fixed-seed subset) keep its
  O(rows^2) cost to about a second.
- `pe_linear_r2`: R^2 of (row, column) predicted from P by ridge regression (RidgeCV over
  a log grid of penalties), out of fold over 5 shuffled folds: how linearly readable the
  position is.
- `pe_moved`: ||P - P0||_F / ||P0||_F, how far training moved the table from its initial
  state P0, rebuilt exactly as training builds it (the run's seed, then its model spec, which
  holds pos_embed_std); 0 for an untrained model; empty with a note where P0 cannot be
  rebuilt (weights trained elsewhere, a run started from other weights, a model in memory).
  Below PE_MOVED_LITTLE the scores describe the initialisation.

Figure (from the same table P): the ViT paper's grid of maps S[i, :] over the token
grid for up to 8 x 8 reference tokens i; `plot` draws the three scores per model.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from localitylab.attention import TokenGeometry, attention_layers, unread_attention_classes
from localitylab.models.pos_embed import sincos_2d
from localitylab.probes.pe_moved import moved_row, position_table
from localitylab.probes.base import Measurements, Probe, ProbeInputs, SummaryColumn
from localitylab.plotting import probes as drawings
from localitylab.probes.registry import register_probe
from localitylab.probes.target import ProbeTarget

MAX_PAIRS = 200_000
# The width of the sin-cos table whose scores each row's note gives as the grid's reference.
SINCOS_REFERENCE_DIM = 64
MAX_TOPOLOGY_ROWS = 400
FOLDS = 5
REFERENCES_PER_SIDE = 8
METRICS = ("pe_distance_spearman", "pe_topology_r2", "pe_linear_r2")


def _unit_rows(table: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(table.double(), dim=1)


def distance_spearman(table: torch.Tensor, geometry: TokenGeometry, seed: int) -> tuple[float, str]:
    """Spearman of S[i, j] against -distance over pairs i < j (sampled past MAX_PAIRS)."""
    from scipy.stats import spearmanr

    count = table.shape[0]
    n_pairs = count * (count - 1) // 2
    if n_pairs <= MAX_PAIRS:
        first, second = torch.triu_indices(count, count, offset=1)
        note = ""
    else:
        generator = torch.Generator().manual_seed(seed)
        first = torch.randint(count, (MAX_PAIRS,), generator=generator)
        shift = torch.randint(1, count, (MAX_PAIRS,), generator=generator)
        second = (first + shift) % count  # uniform over the other tokens
        note = f"{MAX_PAIRS:,} of {n_pairs:,} pairs, sampled with seed {seed}"
    unit = _unit_rows(table)
    similarity = (unit[first] * unit[second]).sum(dim=1)
    centres = geometry.centres(dtype=torch.float64)
    distance = (centres[first] - centres[second]).norm(dim=1)
    if n_pairs < 2:
        return float("nan"), "fewer than two pairs of tokens"
    rho = spearmanr(similarity.numpy(), -distance.numpy()).statistic
    return float(rho), note


def topology_r2(table: torch.Tensor, geometry: TokenGeometry, seed: int) -> tuple[float, str]:
    """1 - Procrustes disparity between a 2-D MDS of 1 - cosine and the true centres."""
    from scipy.spatial import procrustes
    from sklearn.manifold import MDS

    count = table.shape[0]
    if count < 3:
        return float("nan"), "fewer than three tokens"
    rows = torch.arange(count)
    note = ""
    if count > MAX_TOPOLOGY_ROWS:
        rows = torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:MAX_TOPOLOGY_ROWS].sort().values
        note = f"MDS of {MAX_TOPOLOGY_ROWS} of {count} rows, sampled with seed {seed}"
    unit = _unit_rows(table[rows])
    dissimilarity = (1.0 - unit @ unit.T).clamp_min(0.0).numpy()
    np.fill_diagonal(dissimilarity, 0.0)
    dissimilarity = (dissimilarity + dissimilarity.T) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's notices about changing defaults
        embedding = MDS(n_components=2, metric="precomputed", init="classical_mds", n_init=1,
                        random_state=seed).fit_transform(dissimilarity)
    centres = geometry.centres(dtype=torch.float64)[rows].numpy()
    if not np.isfinite(embedding).all() or np.ptp(embedding, axis=0).max() == 0:
        return 0.0, "MDS collapsed to a point: the rows are identical"
    _, _, disparity = procrustes(centres, embedding)
    return float(1.0 - disparity), note


def linear_r2(table: torch.Tensor, geometry: TokenGeometry, seed: int) -> tuple[float, str]:
    """Out-of-fold R^2 of ridge regression from P to the token's (row, column)."""
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold, cross_val_predict

    count = table.shape[0]
    folds = min(FOLDS, count)
    if folds < 2 or min(geometry.grid) < 1 or count < 4:
        return float("nan"), "too few tokens for cross-validation"
    rows, cols = np.meshgrid(np.arange(geometry.grid[0]), np.arange(geometry.grid[1]), indexing="ij")
    coords = np.stack([rows.ravel(), cols.ravel()], axis=1).astype(np.float64)
    varying = coords.std(axis=0) > 0  # a 1-wide grid has a constant coordinate: R^2 undefined there
    ridge = RidgeCV(alphas=np.logspace(-4, 4, 17))
    predicted = cross_val_predict(ridge, table.double().numpy(), coords[:, varying],
                                  cv=KFold(folds, shuffle=True, random_state=seed))
    return float(r2_score(coords[:, varying], predicted)), ""


def similarity_reason(target: ProbeTarget) -> str | None:
    if target.info.grid is None or target.info.patch_size is None:
        if not target.info.is_transformer and not _has_attention(target.model):
            return ("no position embedding: the model has no token grid (a ConvNet or another kind of mixing), so "
                    "pe-similarity does not apply")
        if not target.info.is_transformer:  # attention in stages of its own (LeViT, Twins, TNT, MobileViT, ...)
            return (f"{type(target.model).__name__} has attention but no patch_embed token grid (its stages or "
                    f"embeddings are its own), so no position table to compare with it: pe-similarity does not apply")
        why = f" ({target.info.layout_note})" if target.info.layout_note else ""
        return f"its tokens are not one fixed grid{why}, so no position table to compare with it: pe-similarity does not apply"
    pos_embed = getattr(target.model, "pos_embed", None)
    if not isinstance(pos_embed, torch.Tensor):
        return "no absolute position embedding (pos_embed none), so pe-similarity does not apply"
    if position_table(target.model, target.geometry) is None:
        return (f"pos_embed of shape {tuple(pos_embed.shape)} does not hold one row per token of the "
                f"{target.info.grid[0]}x{target.info.grid[1]} grid")
    return None


@register_probe
class PeSimilarity(Probe):
    name = "pe-similarity"
    summary = "How well the position embedding encodes the grid: rank correlation, 2-D topology, linear read-out"
    applies_to = "models with an absolute position embedding (pit-*, vit-*/P, dit-*/P, timm ViT/DeiT)"
    on_denoiser = "weights"  # the table alone: one measurement, whatever the noise level
    summary_columns = (
        SummaryColumn("pe_spearman", "PE Spearman",
                      "Spearman correlation of position-embedding cosine similarity with -distance",
                      "pe_distance_spearman", better="high",
                      sentence="has the position embedding most ordered by distance (PE Spearman)"),
        SummaryColumn("pe_topology", "PE topology R²",
                      "1 - Procrustes disparity of a 2-D embedding of the position embedding", "pe_topology_r2",
                      better="high"),
    )

    def not_applicable(self, target: ProbeTarget) -> str | None:
        return super().not_applicable(target) or similarity_reason(target)

    def measure(self, inputs: ProbeInputs, out: Measurements) -> torch.Tensor:
        geometry = inputs.target.geometry
        table = position_table(inputs.target.model, geometry)
        reference = sincos_2d(SINCOS_REFERENCE_DIM, *geometry.grid)
        for metric, score in (("pe_distance_spearman", distance_spearman), ("pe_topology_r2", topology_r2),
                              ("pe_linear_r2", linear_r2)):
            value, note = score(table, geometry, inputs.seed)
            perfect, _ = score(reference, geometry, inputs.seed)
            scale = (f"a fixed 2-D sin-cos table on this {geometry.grid[0]}x{geometry.grid[1]} grid scores "
                     f"{perfect:.3g}")
            out.single(metric, value, note="; ".join(part for part in (note, scale) if part), n_images=0)
        moved_row(inputs.target, table, out)
        return table

    def figures(self, target: ProbeTarget, table: torch.Tensor, out_dir: Path) -> list[Path]:
        return drawings.pe_similarity_figures(target, _unit_rows(table), out_dir)

    def plot(self, tables: list[pd.DataFrame], out_dir: Path) -> list[Path]:
        return drawings.plot_pe_similarity(tables, out_dir, METRICS)


def _has_attention(model: torch.nn.Module) -> bool:
    """Attention modules the reader reads, or knows and cannot read: a hybrid, not a ConvNet."""
    return bool(attention_layers(model) or unread_attention_classes(model))

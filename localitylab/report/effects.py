"""The smallest difference worth a word, per metric: set here and nowhere else.

A difference inside it is "no meaningful difference" whatever its interval says; the report
prints this table (docs/probes.md, "Effect size"). For the locality ratio the difference is
from 1 (uniform attention) as well as between models.
"""

from __future__ import annotations

from localitylab.probes.pe_moved import PE_MOVED_LITTLE

# metric (or summary column key) -> smallest difference worth a word, in the metric's own unit
SMALLEST_EFFECT: dict[str, float] = {
    "locality_ratio": 0.05,  # 5% nearer than uniform attention
    "order_dependence": 0.10,  # a tenth of the headroom above chance
    "accuracy_drop": 0.05,  # 5 accuracy points
    "accuracy": 0.05,
    "erf_outside_token": 0.05,  # 5% of the ERF mass
    "erf_r50_frac": 0.02,  # 2% of the image side
    "erf_area_50": 0.02,  # 2% of the image
    "pe_distance_spearman": 0.10,
    "pe_topology_r2": 0.10,
    "pe_linear_r2": 0.10,
    "permutation_gap": 0.05,
}

# A position table that moved less than this, relative to its initial norm, still describes its
# initialisation: the probe's own threshold (its notes say the same), read here, never restated.
PE_MOVED_MIN = PE_MOVED_LITTLE

# Summary columns -> the metric whose threshold they use.
COLUMN_METRIC = {"ratio_first": "locality_ratio", "ratio_last": "locality_ratio", "global_drop": "accuracy_drop",
                 "order_global": "order_dependence", "erf_outside": "erf_outside_token", "erf_r50": "erf_r50_frac",
                 "pe_spearman": "pe_distance_spearman", "pe_topology": "pe_topology_r2", "perm_gap": "permutation_gap",
                 "accuracy": "accuracy"}


def smallest_effect(key: str) -> float | None:
    """The threshold for a summary column key or a metric name (None: none is set)."""
    return SMALLEST_EFFECT.get(COLUMN_METRIC.get(key, key))

"""Captions that say what a figure shows, by the probe and the file the probe's plot wrote
(a figure named after its file, "attention maps q4 4", tells a reader nothing)."""

from __future__ import annotations

import re

OVERLAY = {  # probe-level figures: every model overlaid, one colour per model
    "attention-distance": "Mean attention distance of every head (dots) and the head-mean locality ratio per block, "
                          "against depth; one colour per model; bars: 95% intervals over images; 1 = uniform attention.",
    "attention-distance-noise": "A denoiser's locality ratio per block at each noise level t; bars: 95% intervals.",
    "attention-maps-distance": "Attended distance of each chosen query pixel per block, against the same distance "
                               "under uniform attention; bars: 95% intervals over images.",
    "receptive-field": "Effective-receptive-field radii holding 50% and 90% of the gradient mass, per layer, against "
                       "a uniform map's radii around the same centre; bars: 95% intervals over images.",
    "permutation": "Test accuracy under each test-time pixel alteration (the clean accuracy as a line); bars: 95% "
                   "intervals over images and permutation draws; chance = 1 / classes.",
    "pe-similarity-metrics": "Position-embedding scores per model (Spearman of similarity with distance, topology R², "
                             "linear R²): properties of the weights, no interval; the sin-cos reference for scale.",
    "mae-reconstruction": "Masked-token reconstruction error relative to predicting the mean colour (1 = no better).",
}
PER_MODEL = {
    "receptive-field-maps": "effective receptive field of the location holding the image centre, per layer: "
                            "|gradient| over the input pixels, normalised to sum 1",
    "pe-similarity": "cosine similarity of each reference token's position-embedding row with every other row, "
                     "drawn on the token grid (the ViT paper's Fig. 7)",
    "mae-reconstruction": "masked input, reconstruction with the visible pixels pasted back, and the original",
}


def caption(probe: str, stem: str, per_model: bool = False) -> str:
    """What the figure `stem` (its file name without .png) of `probe` shows."""
    query = re.fullmatch(r"attention-maps-q(\d+)-(\d+)(.*)", stem)
    if query:
        heads = " one row per head" if "head" in query.group(3) else " mean over heads"
        return (f"attention of the query at pixel (row {query.group(1)}, column {query.group(2)}) over the first test "
                f"images, by block ({heads.strip()}); the query is marked")
    table = PER_MODEL if per_model else OVERLAY
    if stem in table:
        return table[stem]
    return (OVERLAY.get(probe) if not per_model and stem.startswith(probe) else None) or stem.replace("-", " ")

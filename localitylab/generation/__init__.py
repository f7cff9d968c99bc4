"""Generation: sample a trained diffusion run, and measure the samples.

It reads runs and data sets (it sits beside `probes`, above `train`): `samples` writes and
reads sample sets (a uint8 array file and a PNG grid, both atomically), `quality` measures
them in the feature space of a classifier the toolkit trained, with the reference rows
that say what a number means, and `inception` adds FID, sFID and IS when the user has the
standard Inception weights.
"""

"""Denoising diffusion: the training objective, the samplers and sample-quality metrics.

Pure functions of a model and tensors (it sits beside `models` and `data`: it imports
neither training nor probes). The noise schedules and samplers are diffusers'; what is
here is what diffusers does not provide for this toolkit: one seeded objective (label
dropout drawn from the batch's generator, so a resumed run draws the same), sampling that
is reproducible from one seed whatever the batch size, and the Fréchet distance and
precision/recall in any feature space.
"""

"""Probes: locality measurements on any model, written as tidy tables (docs/probes.md).

Adding a probe: one file with a `@register_probe` class, and one line below. The order is
the order of `probe all` and of the report's sections: attention first, then the position
embedding, then the probes that put ConvNets on the same scale, then the ones for
particular checkpoints (mae-reconstruction: MAE pre-training only).
"""

from localitylab.probes import (  # noqa: F401  (each registers itself)
    attention_distance,
    attention_maps,
    pe_similarity,
    receptive_field,
    permutation,
    mae_reconstruction,
)
from localitylab.probes.base import COLUMNS, Measurements, Probe, ProbeInputs, ProbeResult, SummaryColumn
from localitylab.probes.registry import get_probe, probe_names, register_probe
from localitylab.probes.output import read_table
from localitylab.probes.runner import ProbeRequest, run_probes
from localitylab.probes.settings import ProbeSettings, option
from localitylab.probes.sources import load_target
from localitylab.probes.target import ProbeTarget
from localitylab.probes.api import describe_keywords

describe_keywords()  # localitylab.probe's keywords: every probe setting registered above

__all__ = ["COLUMNS", "Measurements", "Probe", "ProbeInputs", "ProbeRequest", "ProbeResult", "ProbeSettings", "ProbeTarget",
           "SummaryColumn", "get_probe", "load_target", "probe_names", "read_table", "option", "register_probe", "run_probes"]

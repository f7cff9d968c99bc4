"""Probes: locality measurements on any model, written as tidy tables (PROBES.md)."""

from localitylab.probes.base import COLUMNS, Probe, ProbeContext, Row
from localitylab.probes.registry import get_probe, probe_names, register_probe
from localitylab.probes.runner import ProbeRequest, read_table, run_probes
from localitylab.probes.target import ProbeTarget, load_target

__all__ = ["COLUMNS", "Probe", "ProbeContext", "ProbeRequest", "ProbeTarget", "Row", "get_probe", "load_target",
           "probe_names", "read_table", "register_probe", "run_probes"]

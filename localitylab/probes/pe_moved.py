"""`pe_moved` (docs/probes.md, pe-similarity): ||P - P0||_F / ||P0||_F, how far training
moved a position table from its initial state P0, which is rebuilt exactly as training
builds it (`localitylab.train.loop`: `seed_everything(seed)`, then `build_model(spec)`; the
spec holds pos_embed_std). scripts/defaults_evidence.py reads the same functions.
"""

from __future__ import annotations

import numpy as np
import torch

from localitylab.attention import TokenGeometry
from localitylab.models.registry import ModelSpec, build_model
from localitylab.probes.measurements import Measurements
from localitylab.probes.target import ProbeTarget

PE_MOVED_LITTLE = 0.10  # docs/probes.md: a table that moved less still describes its initialisation


def position_table(model: torch.nn.Module, geometry: TokenGeometry) -> torch.Tensor | None:
    """The (T, C) rows of the absolute position embedding for the grid tokens, or None."""
    pos_embed = getattr(model, "pos_embed", None)
    if not isinstance(pos_embed, torch.Tensor) or pos_embed.dim() != 3:
        return None
    table = pos_embed.detach()[0]
    prefix = 0 if getattr(model, "no_embed_class", False) else geometry.num_prefix_tokens
    if table.shape[0] != prefix + geometry.num_grid_tokens:
        return None
    return table[prefix:].float().cpu()


def initial_model(spec: ModelSpec, seed: int) -> torch.nn.Module:
    """The model a run with this spec and seed started from, built as training builds it
    (`seed_everything(seed)`, then `build_model(spec)`), without disturbing the caller's
    random state."""
    from localitylab.train.loop import seed_everything

    numpy_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            seed_everything(seed)
            return build_model(spec)
    finally:
        np.random.set_state(numpy_state)


def relative_change(table: torch.Tensor, start: torch.Tensor) -> float:
    """||table - start||_F / ||start||_F (NaN for an all-zero start)."""
    start = start.double()
    norm = float(start.norm())
    return float((table.double() - start).norm()) / norm if norm > 0 else float("nan")


def initial_table(target: ProbeTarget) -> tuple[torch.Tensor | None, str]:
    """(P0, note): the grid rows of the position table `target`'s model started from, or None
    and why it cannot be rebuilt."""
    config = target.checkpoint.get("config") if target.checkpoint else None
    if config:
        started = [f"{key} {config[key]}" for key in ("init_from", "weights") if config.get(key)]
        if started:
            return None, f"the run started from other weights ({', '.join(started)}): its initial table is not rebuilt"
        if config.get("seed") is None:
            return None, "the run records no seed: its initial table cannot be rebuilt"
        start = initial_model(target.spec, int(config["seed"]))
        table = position_table(start, target.geometry)
        if table is None:
            return None, "the rebuilt initial model has no position table of this shape"
        return table, f"P0 rebuilt from the run's seed {config['seed']} and model spec"
    if target.weights:
        return None, "weights trained elsewhere: the table they started from is unknown"
    if target.display_name.endswith("(untrained)"):
        return position_table(target.model, target.geometry), "untrained: the table is its initial state"
    return None, "a model in memory with no run record: its initial table cannot be rebuilt"


def moved_row(target: ProbeTarget, table: torch.Tensor, out: Measurements) -> None:
    """The `pe_moved` row (a property of the weights: no images, no interval)."""
    start, note = initial_table(target)
    value = None if start is None else relative_change(table, start)
    if value is not None and value < PE_MOVED_LITTLE:
        note += (f"; moved less than {PE_MOVED_LITTLE:.0%}: the PE scores describe the initialisation more than what "
                 "training learned")
    out.single("pe_moved", value, note=note, n_images=0)

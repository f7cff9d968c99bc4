"""The summary: one row per model (runs that differ only in their training seed are one row,
mean ± spread over seeds), read by reading.py into a one-sentence answer to the title
question and sentences that rank models only where the 95% intervals separate them.

Each value is read from a table on disk; where the table or the row is missing the value is
None and the report shows it as missing, with the command that would produce it.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, replace

import pandas as pd

from localitylab.probes.base import SummaryColumn
from localitylab.report.collect import RunRecord
from localitylab.train.config import DEFINING_SETTINGS, TrainConfig


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    help: str
    probe: str | None  # the probe whose table the value comes from (None: training)
    better: str = ""  # 'low' or 'high' where a direction means "more local"; '' otherwise
    kind: str = "float"  # float | int | pct | flops
    metric: str = ""  # the probe table's metric the value comes from
    skip_tasks: tuple[str, ...] = ()


# From training (run.json): before the probes' columns.
TRAINING_COLUMNS = (
    Column("accuracy", "test acc", "final test accuracy (metrics.csv)", None, kind="pct"),
    Column("params", "params", "parameters", None, kind="int"),
    Column("tokens", "tokens / image", "tokens per image, prefix tokens included", None, kind="int"),
    Column("flops", "GFLOPs / image", "forward FLOPs per image (torch.utils.flop_counter)", None, kind="flops"),
)
# Properties of the architecture: every seed of a recipe has the same.
ARCHITECTURE = ("params", "tokens", "flops")
# From two runs together: after them.
PAIR_COLUMNS = (
    Column("perm_gap", "train-time perm. gap", "clean-trained accuracy - accuracy of the same recipe trained on permuted pixels", None),
)
# Config entries that do not make two runs different experiments: the settings that do not
# define a run (TrainConfig's own `defines_run`: where it goes, on what device, how it is logged...).
NOT_THE_RECIPE = tuple(name for name in TrainConfig.model_fields if name not in DEFINING_SETTINGS)


@dataclass(frozen=True)
class Estimate:
    """A number with its 95% interval where one exists: over images for one run, over
    training seeds (a t interval of their mean) for several; `spread` is the standard
    deviation over seeds."""

    value: float
    low: float | None = None
    high: float | None = None
    spread: float | None = None
    seeds: int = 1
    setting: str = ""  # the row's setting where the column does not fix one (a denoiser's 't=500')

    @property
    def has_interval(self) -> bool:
        return self.low is not None and self.high is not None


UNBOUNDED = (-math.inf, math.inf)


def metric_bounds(metric: str | None) -> tuple[float, float]:
    """The values a metric can take, by its docs/probes.md name: distances and radii, in pixels
    (`*_px`, `*_px_raw`) or as a fraction of the image side (`*_frac`), are >= 0; accuracies
    and shares lie in [0, 1], a drop of accuracy in [-1, 1]; the rest (differences,
    correlations, R²) are left as they are."""
    if metric is None:
        return UNBOUNDED
    if metric.endswith(("_px", "_px_raw", "_frac")):
        return 0.0, math.inf
    if metric in ("accuracy", "prefix_share") or metric.startswith("class_accuracy"):
        return 0.0, 1.0
    if metric == "accuracy_drop":
        return -1.0, 1.0
    return UNBOUNDED


def over_seeds(estimates: list[Estimate], bounds: tuple[float, float] = UNBOUNDED) -> Estimate | None:
    """The mean over seeds, their standard deviation and a 95% interval of the mean: the t
    interval over seeds widened by the runs' own intervals over images (`seed_half_width`).
    With 3 seeds it is wide: it is cut to the metric's `bounds` (a radius in pixels is never
    below 0), which keeps its coverage, since the mean lies within them."""
    kept = [e for e in estimates if e is not None and math.isfinite(e.value)]
    if not kept:
        return None
    if len(kept) == 1:
        return kept[0]
    values = [e.value for e in kept]
    mean, spread = statistics.fmean(values), statistics.stdev(values)
    image_halves = [(e.high - e.low) / 2 for e in kept if e.has_interval]
    half = seed_half_width(spread, len(values), statistics.fmean(image_halves) if image_halves else 0.0)
    return Estimate(mean, max(mean - half, bounds[0]), min(mean + half, bounds[1]), spread, len(values), kept[0].setting)


def seed_half_width(spread, seeds, image_half=0.0):
    """Half the 95% interval of a mean over `seeds` training runs probed on the same images:
    the t interval's t(0.975, n-1)·sd/√n for the training seeds, and, added in quadrature,
    the runs' mean half-width over images. The seeds share the probe's images, so the error
    of drawing those images is common to every run and does not shrink with more seeds;
    without it, three seeds that happen to agree (an accuracy drop of 0.786 three times on
    64 images) would get an interval of zero width. Works on numbers or pandas columns."""
    from scipy.stats import t

    seed_half = t.ppf(0.975, seeds - 1) * spread / seeds ** 0.5
    return (seed_half ** 2 + image_half ** 2) ** 0.5


def over_seeds_table(tables: list[pd.DataFrame], name: str) -> pd.DataFrame:
    """One probe table for a model trained with several seeds: each row's mean over the
    seeds, with the interval of that mean (`seed_half_width`); a single table is returned as
    it is."""
    if len(tables) == 1:
        return tables[0]
    keys = ["probe", "metric", "layer", "head", "setting"]
    stacked = pd.concat(tables, ignore_index=True)
    stacked["image_half"] = (pd.to_numeric(stacked["ci_high"]) - pd.to_numeric(stacked["ci_low"])) / 2
    grouped = stacked.groupby(keys, dropna=False, sort=False)
    frame = grouped.agg(value=("value", "mean"), spread=("value", "std"), seeds=("value", "count"),
                        image_half=("image_half", "mean"), n_images=("n_images", "first"),
                        note=("note", "first")).reset_index()
    half = seed_half_width(frame["spread"], frame["seeds"].clip(lower=2), frame["image_half"].fillna(0.0))
    several = frame["seeds"] > 1
    bounds = frame["metric"].map(metric_bounds)  # each row's interval cut to its metric's range, as over_seeds does
    frame["ci_low"] = (frame["value"] - half).clip(lower=bounds.str[0]).where(several)
    frame["ci_high"] = (frame["value"] + half).clip(upper=bounds.str[1]).where(several)
    frame["model"] = name
    return frame[list(tables[0].columns)]


@dataclass
class ModelGroup:
    """Runs of one recipe that differ only in their training seed (or a single run)."""

    records: list[RunRecord]

    @property
    def name(self) -> str:
        """'pit-n (pit-n-T16, 3 seeds)' where the run folders differ only in a study's
        '-s<seed>'; else every folder is listed."""
        if len(self.records) == 1:
            return self.records[0].name
        spec, count = self.records[0].spec.get("name", "?"), len(self.records)
        stems = {re.sub(rf"-s{r.config.get('seed')}(?=$|-perm)", "", r.path.name, count=1) for r in self.records}
        if len(stems) == 1 and stems != {r.path.name for r in self.records}:
            return f"{spec} ({stems.pop()}, {count} seeds)"
        return f"{spec} ({count} seeds: {', '.join(r.path.name for r in self.records)})"

    @property
    def first(self) -> RunRecord:
        return self.records[0]


def recipe_key(record: RunRecord, *ignored: str) -> tuple:
    """What must match for two runs to be the same experiment (up to `ignored` settings)."""
    config = {k: v for k, v in record.config.items() if k not in NOT_THE_RECIPE + ignored}
    return (record.spec.get("name"), record.data, repr(sorted(config.items())))


def group_by_seed(records: list[RunRecord]) -> list[ModelGroup]:
    """Runs whose recipes differ only in `seed` become one group; copies of one run (the
    same seed twice) and untrained models stay apart."""
    keyed: dict[tuple, list[RunRecord]] = {}
    for record in records:
        key = recipe_key(record, "seed") if record.trained else ("untrained", record.name)
        keyed.setdefault(key, []).append(record)
    groups = []
    for members in keyed.values():
        seeds = [m.config.get("seed") for m in members]
        if len(members) > 1 and len(set(seeds)) == len(seeds):
            groups.append(ModelGroup(sorted(members, key=lambda m: m.config.get("seed"))))
        else:
            groups += [ModelGroup([member]) for member in members]
    return groups


# Columns the report adds for the Round 3 measures (docs/probes.md) where a probe's table holds
# them and the probe does not declare a column of its own for them: shown only when some run has them.
EXTRA_COLUMNS = (
    SummaryColumn("order_global", "order dependence, global shuffle",
                  "(clean - shuffled) / (clean - chance): the share of the headroom above chance that a global pixel "
                  "shuffle removes", "order_dependence", setting="global", better="high", skip_tasks=("mae",),
                  sentence="depends most on pixel order (largest share of its headroom above chance lost under a "
                           "global shuffle)", probe="permutation"),
    SummaryColumn("erf_outside", "ERF outside token",
                  "share of the last layer's effective receptive field outside the pixels of its own token",
                  "erf_outside_token", layer="last", better="low",
                  sentence="has the most local effective receptive field in its last layer (least ERF mass outside "
                           "its own token)", probe="receptive-field"),
    SummaryColumn("pe_moved", "PE moved", "||P - P0|| / ||P0||: how far the position table moved from its initial "
                  "state", "pe_moved", probe="pe-similarity"),
)
EXTRA_KEYS = tuple(c.key for c in EXTRA_COLUMNS)


def probe_columns() -> list[SummaryColumn]:
    """Every registered probe's summary columns, in registry order, each knowing its probe,
    each followed by the EXTRA_COLUMNS of its probe that it does not declare itself."""
    from localitylab.probes.registry import get_probe, probe_names

    declared = [replace(column, probe=name) for name in probe_names() for column in get_probe(name).summary_columns]
    have = {(c.probe, c.metric, c.setting) for c in declared} | {c.key for c in declared}
    result = []
    for name in probe_names():
        result += [c for c in declared if c.probe == name]
        result += [c for c in EXTRA_COLUMNS if c.probe == name and c.key not in have
                   and (c.probe, c.metric, c.setting) not in have]
    return result


def columns() -> list[Column]:
    probe_part = [Column(c.key, c.label, c.help, c.probe, c.better, c.kind, c.metric, c.skip_tasks)
                  for c in probe_columns()]
    return [*TRAINING_COLUMNS, *probe_part, *PAIR_COLUMNS]


def _run_values(record: RunRecord, records: list[RunRecord]) -> dict[str, Estimate | None]:
    flops = record.model_info.get("flops_per_image")
    plain = {"accuracy": record.accuracy, "params": record.model_info.get("params"),
             "tokens": record.model_info.get("tokens_per_image"), "flops": flops / 1e9 if flops else None,
             "perm_gap": permutation_gap(record, records)}
    row: dict[str, Estimate | None] = {k: None if v is None else Estimate(v) for k, v in plain.items()}
    from localitylab.report.judge import read_cell

    for column in probe_columns():
        read = None if record.config.get("task") in column.skip_tasks else read_cell(column, record.tables.get(column.probe))
        row[column.key] = None if read is None else Estimate(*read[0], setting=read[1])
    return row


def summary_row(group: ModelGroup | RunRecord, records: list[RunRecord]) -> dict[str, Estimate | None]:
    """Every column's estimate for one model: its run's, or the mean over its seeds."""
    members = group.records if isinstance(group, ModelGroup) else [group]
    per_run = [_run_values(record, records) for record in members]
    if len(per_run) == 1:
        return per_run[0]
    metrics = {"accuracy": "accuracy", **{column.key: column.metric for column in probe_columns()}}
    row = {key: over_seeds([run[key] for run in per_run if run[key] is not None], metric_bounds(metrics.get(key)))
           for key in per_run[0]}
    for key in ARCHITECTURE:  # the same for every seed: no spread to show
        row[key] = per_run[0][key]
    return row


def permutation_gap(record: RunRecord, records: list[RunRecord]) -> float | None:
    """Clean accuracy - permuted accuracy, shown on the clean run, where both runs exist
    (the same recipe and seed, trained once on natural and once on permuted pixels)."""
    if not record.trained or record.permute_seed is not None or record.accuracy is None:
        return None
    for other in records:
        if (other.permute_seed is not None and other.accuracy is not None
                and recipe_key(other, "permute_pixels") == recipe_key(record, "permute_pixels")):
            return record.accuracy - other.accuracy
    return None


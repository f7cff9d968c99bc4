"""The summary table: one row per model, answering "which model learned how much locality".

Each value is read from a table on disk; where the table or the row is missing the value
is None and the report shows it as missing, with the command that would produce it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd

from localitylab.report.collect import RunRecord


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    help: str
    probe: str | None  # the probe whose table the value comes from (None: training)
    better: str = ""  # 'low' or 'high' where a direction means "more local"; '' otherwise
    kind: str = "float"  # float | int | pct | flops


COLUMNS = (
    Column("accuracy", "test acc", "final test accuracy (metrics.csv)", None, kind="pct"),
    Column("params", "params", "parameters", None, kind="int"),
    Column("tokens", "tokens / image", "tokens per image, prefix tokens included", None, kind="int"),
    Column("flops", "GFLOPs / image", "forward FLOPs per image (torch.utils.flop_counter)", None, kind="flops"),
    Column("ratio_first", "locality ratio, first block", "mean over heads of mean attention distance / uniform distance, block 0 (below 1 = local)", "attention-distance", "low"),
    Column("ratio_last", "locality ratio, last block", "the same for the last block", "attention-distance", "low"),
    Column("pe_spearman", "PE Spearman", "Spearman correlation of position-embedding cosine similarity with -distance", "pe-similarity", "high"),
    Column("pe_topology", "PE topology R²", "1 - Procrustes disparity of a 2-D embedding of the position embedding", "pe-similarity", "high"),
    Column("erf_r50", "ERF r50 (frac)", "radius holding 50% of the effective receptive field of the last layer, / image side", "receptive-field", "low"),
    Column("global_drop", "acc drop, global shuffle", "test accuracy lost under one fixed global pixel permutation", "permutation", "high"),
    Column("perm_gap", "train-time perm. gap", "clean-trained accuracy - accuracy of the same recipe trained on permuted pixels", None),
)


def _value(table: pd.DataFrame | None, metric: str, reduce: Callable[[pd.DataFrame], Any] | None = None,
           **where: Any) -> float | None:
    if table is None:
        return None
    rows = table[table["metric"] == metric]
    for column, wanted in where.items():
        rows = rows[rows[column] == wanted]
    rows = rows[rows["value"].notna()]
    if rows.empty:
        return None
    if reduce is not None:
        return reduce(rows)
    return float(rows["value"].iloc[0])


def _layer_mean(which: str) -> Callable[[pd.DataFrame], float]:
    def reduce(rows: pd.DataFrame) -> float:
        layer = rows["layer"].min() if which == "first" else rows["layer"].max()
        return float(rows[rows["layer"] == layer]["value"].mean())

    return reduce


def _last_layer(rows: pd.DataFrame) -> float:
    return float(rows[rows["layer"] == rows["layer"].max()]["value"].iloc[0])


def summary_row(record: RunRecord, records: list[RunRecord]) -> dict[str, Any]:
    attention = record.tables.get("attention-distance")
    pe = record.tables.get("pe-similarity")
    erf = record.tables.get("receptive-field")
    perm = record.tables.get("permutation")
    flops = record.model_info.get("flops_per_image")
    return {
        "accuracy": record.accuracy,
        "params": record.model_info.get("params"),
        "tokens": record.model_info.get("tokens_per_image"),
        "flops": flops / 1e9 if flops else None,
        "ratio_first": _value(attention, "locality_ratio", _layer_mean("first")),
        "ratio_last": _value(attention, "locality_ratio", _layer_mean("last")),
        "pe_spearman": _value(pe, "pe_distance_spearman"),
        "pe_topology": _value(pe, "pe_topology_r2"),
        "erf_r50": _value(erf, "erf_r50_frac", _last_layer),
        # An MAE encoder's head was never trained: there is no accuracy to lose.
        "global_drop": None if record.config.get("task") == "mae" else _value(perm, "accuracy_drop", setting="global"),
        "perm_gap": permutation_gap(record, records),
    }


def recipe_key(record: RunRecord) -> tuple:
    """What must match for two runs to differ only in --permute-pixels."""
    config = {k: v for k, v in record.config.items()
              if k not in ("permute_pixels", "out", "resume", "device", "compile", "data_dir", "download")}
    return (record.spec.get("name"), record.data, repr(sorted(config.items())))


def permutation_gap(record: RunRecord, records: list[RunRecord]) -> float | None:
    """Clean accuracy - permuted accuracy, shown on the clean run, where both runs exist."""
    if not record.trained or record.permute_seed is not None or record.accuracy is None:
        return None
    for other in records:
        if other.permute_seed is not None and other.accuracy is not None and recipe_key(other) == recipe_key(record):
            return record.accuracy - other.accuracy
    return None


def reading(rows: dict[str, dict[str, Any]]) -> list[str]:
    """A few plain sentences ranking the models by each locality measure."""
    sentences = []
    checks = [
        ("ratio_first", "attends most locally in its first block (lowest locality ratio)", min),
        ("pe_spearman", "has the position embedding most ordered by distance (PE Spearman)", max),
        ("erf_r50", "has the tightest effective receptive field in its last layer (ERF r50)", min),
        ("global_drop", "depends most on pixel order (largest drop under a global shuffle)", max),
    ]
    for key, text, pick in checks:
        values = {name: row[key] for name, row in rows.items() if row.get(key) is not None}
        if len(values) >= 2:
            best = pick(values, key=values.get)
            other = ", ".join(f"{n} {v:.3g}" for n, v in sorted(values.items(), key=lambda kv: kv[1]) if n != best)
            sentences.append(f"{best} {text}: {values[best]:.3g} (others: {other}).")
    return sentences

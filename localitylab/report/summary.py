"""The summary table: one row per model, answering "which model learned how much locality".

Each value is read from a table on disk; where the table or the row is missing the value
is None and the report shows it as missing, with the command that would produce it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from localitylab.probes.base import SummaryColumn
from localitylab.report.collect import RunRecord


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    help: str
    probe: str | None  # the probe whose table the value comes from (None: training)
    better: str = ""  # 'low' or 'high' where a direction means "more local"; '' otherwise
    kind: str = "float"  # float | int | pct | flops


# From training (run.json): before the probes' columns.
TRAINING_COLUMNS = (
    Column("accuracy", "test acc", "final test accuracy (metrics.csv)", None, kind="pct"),
    Column("params", "params", "parameters", None, kind="int"),
    Column("tokens", "tokens / image", "tokens per image, prefix tokens included", None, kind="int"),
    Column("flops", "GFLOPs / image", "forward FLOPs per image (torch.utils.flop_counter)", None, kind="flops"),
)
# From two runs together: after them.
PAIR_COLUMNS = (
    Column("perm_gap", "train-time perm. gap", "clean-trained accuracy - accuracy of the same recipe trained on permuted pixels", None),
)


def probe_columns() -> list[SummaryColumn]:
    """Every registered probe's summary columns, in registry order, each knowing its probe."""
    from localitylab.probes.registry import get_probe, probe_names

    return [replace(column, probe=name) for name in probe_names() for column in get_probe(name).summary_columns]


def columns() -> list[Column]:
    probe_part = [Column(c.key, c.label, c.help, c.probe, c.better, c.kind) for c in probe_columns()]
    return [*TRAINING_COLUMNS, *probe_part, *PAIR_COLUMNS]


def summary_row(record: RunRecord, records: list[RunRecord]) -> dict[str, Any]:
    flops = record.model_info.get("flops_per_image")
    row: dict[str, Any] = {
        "accuracy": record.accuracy,
        "params": record.model_info.get("params"),
        "tokens": record.model_info.get("tokens_per_image"),
        "flops": flops / 1e9 if flops else None,
    }
    for column in probe_columns():
        skipped = record.config.get("task") in column.skip_tasks
        row[column.key] = None if skipped else column.read(record.tables.get(column.probe))
    row["perm_gap"] = permutation_gap(record, records)
    return row


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
    """A few plain sentences ranking the models by each locality measure that has one."""
    sentences = []
    for column in probe_columns():
        if not column.sentence:
            continue
        pick = min if column.better == "low" else max
        values = {name: row[column.key] for name, row in rows.items() if row.get(column.key) is not None}
        if len(values) >= 2:
            best = pick(values, key=values.get)
            other = ", ".join(f"{n} {v:.3g}" for n, v in sorted(values.items(), key=lambda kv: kv[1]) if n != best)
            sentences.append(f"{best} {column.sentence}: {values[best]:.3g} (others: {other}).")
    return sentences

"""What the numbers support: the answer sentence and one sentence per ranked measure.

Rules (docs/probes.md, "Reading the numbers"):
- a model at chance is named once, first, as at chance, and ranked nowhere;
- a model is named first only where its 95% interval separates it from every other model
  AND it leads by at least the metric's smallest difference worth a word (effects.py);
- order dependence is ranked on (clean - shuffled) / (clean - chance) where the rows exist;
  a raw accuracy drop is shown, never ranked: it is capped by clean accuracy minus chance;
- the ERF is ranked on the continuous `erf_outside_token` where it exists; radii whose
  interval has zero width are fixed by the patch geometry and are not ranked.
"""

from __future__ import annotations

from itertools import combinations

from localitylab.report.effects import PE_MOVED_MIN, smallest_effect
from localitylab.report.judge import Chance, zero_width
from localitylab.report.numbers import fmt_interval, fmt_number
from localitylab.report.summary import Estimate, ModelGroup, over_seeds, probe_columns


def fmt_estimate(estimate: Estimate, digits: int = 3) -> str:
    value, interval = fmt_interval(estimate.value, estimate.low, estimate.high)
    text = value
    if estimate.seeds > 1 and estimate.spread is not None:
        text += f" ± {fmt_number(estimate.spread, 2)} (sd over {estimate.seeds} seeds"
        text += f"; 95% CI {interval})" if interval else ")"
    elif interval:
        text += f" {interval}"
    return text + (f" at {estimate.setting}" if estimate.setting else "")


def _overlap(a: Estimate, b: Estimate) -> bool:
    return a.low <= b.high and b.low <= a.high


def chance_sentence(chance: dict[str, Chance | None]) -> str:
    """'At chance ...' naming every model whose clean accuracy's interval includes chance."""
    names = [f"{name} (clean accuracy {fmt_estimate(Estimate(c.value, c.low, c.high))}"
             f"{' on the permutation probe' + chr(39) + 's images' if c.low is not None else ''}, chance {fmt_number(c.chance)})"
             for name, c in chance.items() if c is not None and c.at_chance]
    if not names:
        return ""
    return (f"At chance, so marked and ranked nowhere (its clean test accuracy's 95% interval includes 1 / classes: "
            f"it learned nothing the probes could describe): {'; '.join(names)}.")


def reading(rows: dict[str, dict[str, Estimate | None]], chance: dict[str, Chance | None] | None = None) -> list[str]:
    """One sentence per ranked measure, over the models that are not at chance."""
    chance = chance or {}
    excluded = {name for name, c in chance.items() if c is not None and c.at_chance}
    present = {key for row in rows.values() for key, e in row.items() if e is not None}
    sentences = []
    for column in probe_columns():
        if not column.sentence:
            continue
        values = {name: row[column.key] for name, row in rows.items()
                  if row.get(column.key) is not None and name not in excluded}
        if column.key == "global_drop" and "order_global" in present:
            continue  # ranked on order dependence instead
        if column.key == "erf_r50" and "erf_outside" in present:
            if any(zero_width(e) for e in values.values()):
                sentences.append(_geometry_sentence(column, values, ranked_elsewhere=True))
            continue
        if len(values) < 2:
            continue
        if column.key == "global_drop":
            sentences.append(_raw_drop_sentence(column, values, chance))
        elif column.key == "erf_r50" and any(zero_width(e) for e in values.values()):
            sentences.append(_geometry_sentence(column, values, ranked_elsewhere=False))
        else:
            sentences.append(_ranked(column, values))
    return sentences


def _listed(ordered) -> str:
    return "; ".join(f"{n} {fmt_estimate(e)}" for n, e in ordered)


def _raw_drop_sentence(column, values, chance) -> str:
    parts = []
    for name, e in sorted(values.items()):
        c = chance.get(name)
        cap = f", capped at {fmt_number(c.headroom)} (clean {fmt_number(c.value)} - chance {fmt_number(c.chance)})" if c else ""
        parts.append(f"{name} {fmt_estimate(e)}{cap}")
    return (f"{column.label} (raw): {'; '.join(parts)}. Not ranked: a drop is capped by clean accuracy minus "
            f"chance, so it mostly measures clean accuracy; the share of the headroom lost (order dependence) "
            f"compares models, and these tables do not have it yet.")


def _geometry_sentence(column, values, ranked_elsewhere: bool) -> str:
    fixed = [name for name, e in values.items() if zero_width(e)]
    text = (f"{column.label}: the radii of {', '.join(sorted(fixed))} have zero-width intervals: the field sits on "
            f"the token's own patch, so the radius takes a discrete value the patch size decides (patch geometry "
            f"alone decides it). Not ranked on radii")
    return text + (": the ranking uses the continuous ERF outside token." if ranked_elsewhere
                   else f" ({_listed(sorted(values.items()))}).")


def _ranked(column, values: dict[str, Estimate]) -> str:
    low_is_better = column.better == "low"
    ordered = sorted(values.items(), key=lambda kv: kv[1].value, reverse=not low_is_better)
    best_name, best = ordered[0]
    listed = _listed(ordered)
    if not all(e.has_interval for e in values.values()):
        return (f"{column.label}: {listed}. Not ranked: without an interval for every model (one training seed "
                f"and a property of the weights) a difference cannot be told from chance.")
    others = [e for _, e in ordered[1:]]
    separated = all(best.high < o.low for o in others) if low_is_better else all(best.low > o.high for o in others)
    threshold = smallest_effect(column.key) or smallest_effect(column.metric)
    lead = abs(best.value - ordered[1][1].value)
    if separated and threshold is not None and lead < threshold:
        return (f"{column.label}: no meaningful difference: the intervals separate {best_name}, but by "
                f"{fmt_number(lead)}, less than {fmt_number(threshold)}, the smallest difference worth a word "
                f"({listed}).")
    if separated:
        return f"{best_name} {column.sentence}, separated from every other model by the 95% intervals: {listed}."
    if all(_overlap(a, b) for (_, a), (_, b) in combinations(ordered, 2)):
        return f"{column.label}: the models are indistinguishable within the 95% intervals ({listed})."
    leading = _listed([(n, e) for n, e in ordered if _overlap(best, e)])
    behind = _listed([(n, e) for n, e in ordered if not _overlap(best, e)])
    text = (f"{column.label}: no model is separated from every other by the 95% intervals. "
            f"Overlapping the first's interval: {leading}.")
    return text + (f" Behind them, separated from the first: {behind}." if behind
                   else " Some pairs among them are separated by their intervals.")


def pe_notes(rows: dict[str, dict[str, Estimate | None]]) -> list[str]:
    """A note for each model whose position table barely moved from its initialisation."""
    notes = []
    for name, row in rows.items():
        moved = row.get("pe_moved")
        if moved is not None and moved.value < PE_MOVED_MIN:
            notes.append(f"{name}: its position table moved {100 * moved.value:.2g}% from its initial state (pe_moved "
                         f"{fmt_number(moved.value)} < {fmt_number(PE_MOVED_MIN)}), so its PE scores describe its "
                         f"initialisation, not what training learned.")
    return notes


def locality_answer(groups: list[ModelGroup], chance: dict[str, Chance | None] | None = None) -> str:
    """The answer to "how much locality did each model learn?": at-chance models first, then,
    per model, its most local layer: "local" where the ratio's interval lies below 1 and the
    ratio is at least the smallest effect below 1, "no meaningful locality" where it is
    significant but smaller."""
    chance = chance or {}
    first = chance_sentence({g.name: chance.get(g.name) for g in groups})
    threshold = smallest_effect("locality_ratio")
    local, faint, none, unmeasured, single_seed = [], [], [], [], False
    for group in groups:
        if chance.get(group.name) is not None and chance[group.name].at_chance:
            continue
        per_layer = _ratio_per_layer(group)
        if not per_layer:
            unmeasured.append(group.name)
            continue
        single_seed |= len(group.records) == 1
        layer, best = min(per_layer.items(), key=lambda kv: kv[1].value)
        quoted = f"{group.name} (layer {layer}: ratio {fmt_estimate(best)})"
        if best.has_interval and best.high < 1 and 1 - best.value >= threshold:
            local.append(quoted)
        elif best.has_interval and best.high < 1:
            faint.append(quoted)
        else:
            none.append(quoted)
    parts = [first] if first else []
    if local:
        parts.append(f"Local (locality ratio at least {fmt_number(threshold)} below 1, the smallest difference worth "
                     f"a word, with its 95% interval below 1), at its most local layer: {'; '.join(local)}.")
    if faint:
        parts.append(f"No meaningful locality (below 1 by its interval, but by less than {fmt_number(threshold)}): "
                     f"{'; '.join(faint)}.")
    if none:
        parts.append(f"Not more local than uniform attention in any layer: {'; '.join(none)}.")
    if not (local or faint or none):
        parts.append("No model here has attention to measure; see the receptive fields and the permutation tests.")
    elif single_seed:
        parts.append("Intervals are over images for each trained model, not over training seeds.")
    if unmeasured and (local or faint or none):
        parts.append(f"({', '.join(unmeasured)}: no attention to measure.)")
    return " ".join(parts)


def _ratio_per_layer(group: ModelGroup) -> dict[int, Estimate]:
    """Layer -> the head-mean locality ratio over the group's seeds, at the first setting of
    the table (a denoiser's first noise level, the row the summary column quotes)."""
    import pandas as pd

    per_layer: dict[int, list[Estimate]] = {}
    for record in group.records:
        table = record.tables.get("attention-distance")
        if table is None:
            continue
        rows = table[(table["metric"] == "locality_ratio") & table["head"].isna() & table["value"].notna()]
        if rows.empty:
            continue
        first_layer = rows[rows["layer"] == rows["layer"].min()]
        setting = first_layer.iloc[0]["setting"]
        rows = rows[rows["setting"].isna()] if pd.isna(setting) else rows[rows["setting"] == setting]
        for row in rows.itertuples():
            low = None if pd.isna(row.ci_low) else float(row.ci_low)
            high = None if pd.isna(row.ci_high) else float(row.ci_high)
            named = "" if pd.isna(setting) else str(setting)
            per_layer.setdefault(int(row.layer), []).append(Estimate(float(row.value), low, high, setting=named))
    return {layer: over_seeds(estimates) for layer, estimates in sorted(per_layer.items())}

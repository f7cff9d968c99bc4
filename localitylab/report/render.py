"""Render a report: one self-contained HTML file and a PDF from the same template.

Figures are drawn from the tables on disk (each probe's own `plot`, models overlaid, one
colour per model throughout) and inlined as base64 PNGs, so the HTML makes no request at
view time. The PDF is WeasyPrint over the same HTML with print CSS.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from localitylab.errors import UserError
from localitylab.io import atomic_path, check_folder, write_text
from localitylab.report.collect import RunRecord, collect_runs
from localitylab.report.captions import caption
from localitylab.report.figures import Figure, image_uri
from localitylab.report.numbers import fmt_interval
from localitylab.report.summary import EXTRA_KEYS, columns, group_by_seed, metric_bounds, summary_row
from localitylab.progress import SILENT, Progress

FORMATS = ("html", "pdf")


@dataclass
class ProbeSection:
    name: str
    summary: str
    figures: list[Figure] = field(default_factory=list)
    model_figures: list[tuple[str, Figure]] = field(default_factory=list)
    tables: list[tuple[str, list[dict[str, Any]], int, str]] = field(default_factory=list)  # (model, rows shown, all, csv)
    not_applicable: list[tuple[str, str]] = field(default_factory=list)  # (model, why)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (model, command)


def fmt(value: Any, kind: str = "float") -> str:
    """How a number is shown; the exact value travels in the cell's data-value attribute."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or not isinstance(value, (int, float, str)):
        return "—"  # also a field an older run.json does not record
    if isinstance(value, str):  # a published qualitative fact
        return value
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "flops":
        return f"{value:.3g}"
    if isinstance(value, (int,)) and not isinstance(value, bool):
        return str(value)
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def interval_text(estimate, kind: str = "float") -> str:
    """What stands under a summary number: its 95% interval, or ± its spread over seeds."""
    if estimate is None:
        return ""
    if estimate.seeds > 1 and estimate.spread is not None:
        return f"± {fmt(estimate.spread, kind)} sd, {estimate.seeds} seeds"
    if estimate.has_interval:
        if kind == "float":
            return fmt_interval(estimate.value, estimate.low, estimate.high)[1]
        return f"[{fmt(estimate.low, kind)}, {fmt(estimate.high, kind)}]"
    return ""


def value_text(estimate, kind: str = "float") -> str:
    """A summary number at the digits its interval needs (docs/probes.md, Digits)."""
    if estimate is None:
        return fmt(None)
    if kind == "float" and estimate.has_interval and estimate.seeds == 1:
        return fmt_interval(estimate.value, estimate.low, estimate.high)[0]
    return fmt(estimate.value, kind)


def row_text(row: dict[str, Any]) -> tuple[str, str]:
    """A probe-table row's value and interval, printed at the digits they need together."""
    if row.get("value") is None:
        return "", ""
    if row.get("ci_low") is None or row.get("ci_high") is None:
        return fmt(row["value"]), ""
    value, interval = fmt_interval(row["value"], row["ci_low"], row["ci_high"], sep=" – ")
    return value, interval.strip("[]")


def probe_command(probe: str, record: RunRecord) -> str:
    source = record.path / "ckpt.pt" if record.trained else record.path
    return f"localitylab probe {probe} {source}"


def _table_rows(table: pd.DataFrame) -> list[dict[str, Any]]:
    rows = []
    for record in table.to_dict("records"):
        rows.append({k: (None if (v is pd.NA or (isinstance(v, float) and math.isnan(v))) else v) for k, v in record.items()})
    return rows


@dataclass
class GenerationSection:
    """Diffusion runs: their sample grids, the sample-quality rows with the reference rows
    (each distinct reference row once), and the commands for what is missing."""

    grids: list[tuple[str, Figure]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.grids or self.rows or self.missing)


def _generation_section(records: list[RunRecord]) -> GenerationSection:
    from localitylab.models.registry import model_kind

    section = GenerationSection()
    tables, seen = [], set()
    for record in records:
        name = record.spec.get("name", "")
        diffusion = bool(name) and not name.startswith("timm:") and _kind(model_kind, name) == "dit"
        if record.sample_grid is not None:
            caption = record.sample_meta.get("sample_meta", {})
            setting = (f"{caption.get('sampler')}, {caption.get('steps')} steps, guidance {caption.get('guidance')}, "
                       f"seed {caption.get('seed')}" if caption else "one row per class")
            section.grids.append((record.name, Figure("samples", image_uri(record.sample_grid), setting)))
        elif diffusion:
            section.missing.append((record.name, f"localitylab sample {record.path}"))
        if record.sample_quality is not None:
            for row in _table_rows(record.sample_quality):
                key = (row["model"], row["metric"], row["setting"], row["n_images"], row["value"])
                if row["model"].startswith("reference:") and key in seen:
                    continue
                seen.add(key)
                tables.append(row)
        elif diffusion and record.sample_grid is not None:
            section.missing.append((record.name, f"localitylab evaluate-samples {record.path}, with a classifier trained on the same data"))
    order = {"fd": 0, "precision": 1, "recall": 2, "class": 3, "fid": 4, "sfid": 5, "inception": 6}
    section.rows = sorted(tables, key=lambda r: (order.get(r["metric"].split("_")[0], 9), r["metric"],
                                                 r["model"].startswith("reference:"), r["model"]))
    return section


def _kind(model_kind, name: str) -> str | None:
    try:
        return model_kind(name)
    except UserError:  # a model this version does not know
        return None


def _probe_sections(records: list[RunRecord], figure_dir: Path) -> list[ProbeSection]:
    from localitylab.plotting import apply_style
    from localitylab.probes.registry import get_probe, probe_names
    from localitylab.report.summary import group_by_seed, over_seeds_table

    apply_style()
    names = probe_names() + sorted({p for r in records for p in r.tables if p not in probe_names()})
    sections = []
    for name in names:
        try:
            probe = get_probe(name)
            summary = probe.summary
        except UserError:
            probe, summary = None, "(a probe this version of localitylab does not know)"
        section = ProbeSection(name, summary)
        groups = group_by_seed(records)
        # A model trained with several seeds is drawn once: the mean over seeds, its interval (seeds and images) as bars.
        tables = [over_seeds_table([r.tables[name] for r in group.records if name in r.tables], group.name)
                  for group in groups if any(name in r.tables for r in group.records)]
        # Per-model pictures (maps) of a seed group: its first seed's; the others' are in their probe folders.
        if probe is not None and tables:
            out = figure_dir / name
            out.mkdir(parents=True, exist_ok=True)
            for path in probe.plot(tables, out):
                section.figures.append(Figure(path.stem.replace("-", " "), image_uri(path), caption(name, path.stem)))
        for group in groups:  # the appendix: one table per model, a seed group's mean over its seeds
            present = [r for r in group.records if name in r.tables]
            section.missing += [(r.name, probe_command(name, r)) for r in group.records if name not in r.tables]
            if not present:
                continue
            table = over_seeds_table([r.tables[name] for r in present], group.name)
            rows = _table_rows(table)
            if rows and all(r.get("value") is None for r in rows):  # the probe ran and says why it does not apply
                why = next((r["note"] for r in rows if r.get("note")), "the probe wrote no value for this model")
                section.not_applicable.append((group.name, why))
                continue
            # The head-mean and per-model rows; the per-head rows stay in the CSV.
            shown = [r for r in rows if r.get("head") is None] or rows
            where = str(present[0].path / "probes" / f"{name}.csv")
            if len(present) > 1:
                where = f"the probes folder of each of its {len(present)} runs (this table: their mean)"
            section.tables.append((group.name, shown, len(rows), where))
            for record in present[:1]:
                for path in record.artifacts.get(name, []):
                    if path.suffix == ".png":
                        section.model_figures.append((record.name, Figure(
                            path.stem.replace("-", " "), image_uri(path), caption(name, path.stem, per_model=True))))
        sections.append(section)
    return sections


def _training_figure(groups: list, figure_dir: Path) -> Figure | None:
    """Training loss and test accuracy per epoch, one line per model; a model trained with
    several seeds is drawn as the mean over its seeds with a band: the 95% t interval of that
    mean at each epoch."""
    from localitylab.plotting import apply_style, model_colours, save_figure

    curves = [(group.name, [r.history for r in group.records if r.history is not None and not r.history.empty])
              for group in groups]
    curves = [(name, histories) for name, histories in curves if histories]
    if not curves:
        return None
    import matplotlib.pyplot as plt
    from scipy.stats import t

    apply_style()
    colours = model_colours([group.name for group in groups])
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(12, 3.6))
    banded = False
    for name, histories in curves:
        for ax, column in ((loss_ax, "train_loss"), (acc_ax, "test_acc")):
            per_epoch = pd.concat([h.set_index("epoch")[column].astype(float) for h in histories], axis=1)
            mean = per_epoch.mean(axis=1)
            ax.plot(mean.index, mean.to_numpy(), color=colours[name], label=name)
            seeds = per_epoch.notna().sum(axis=1)
            if (seeds > 1).any():
                half = t.ppf(0.975, (seeds - 1).clip(lower=1)) * per_epoch.std(axis=1) / seeds.clip(lower=1) ** 0.5
                half = half.where(seeds > 1)
                low, high = metric_bounds("accuracy") if column == "test_acc" else (0.0, math.inf)  # a loss is >= 0
                ax.fill_between(mean.index, (mean - half).clip(lower=low).to_numpy(),
                                (mean + half).clip(upper=high).to_numpy(), color=colours[name], alpha=0.2, linewidth=0)
                banded = True
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    acc_ax.set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy")
    acc_ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    path = save_figure(fig, figure_dir / "training-curves.png")
    caption = "From each run's metrics.csv."
    if banded:
        caption += (" A model trained with several seeds: the mean over its seeds, and a band for the 95% t interval "
                    "of that mean at each epoch.")
    return Figure("training curves", image_uri(path), caption)


def train_swaps(config: dict[str, Any]) -> tuple[str, str] | None:
    """(T, d) of a run trained on permuted pixels, as the figure labels them: ('0', '') for
    natural pixels, ('full', '') for one full random permutation, ('64', '2') for 64 swaps
    within distance 2; None for a run that is not a classifier trained here."""
    if config.get("task", "classify") != "classify":
        return None
    if config.get("permute_pixels") is None:
        return "0", ""
    if config.get("swaps") is None:
        return "full", ""
    distance = config.get("swap_distance")
    return str(config["swaps"]), "inf" if distance is None or math.isinf(distance) else f"{distance:g}"


def _train_swaps_figure(groups: list, figure_dir: Path) -> Figure | None:
    """Test accuracy against the number of train-time pixel swaps T (the PiT paper's
    experiment), one line per model and swap distance; drawn where some run was trained on swaps."""
    from localitylab.plotting import apply_style, errorbar, model_colours, save_figure
    from localitylab.report.summary import Estimate, over_seeds

    points: dict[str, dict[tuple[str, str], Estimate]] = {}
    for group in groups:
        where = train_swaps(group.first.config) if group.first.trained else None
        accuracies = [Estimate(r.accuracy) for r in group.records if r.accuracy is not None]
        if where is None or not accuracies:
            continue
        points.setdefault(group.first.spec.get("name", "?"), {})[where] = over_seeds(accuracies, metric_bounds("accuracy"))
    if not any(d for where in points.values() for _, d in where):
        return None
    import matplotlib.pyplot as plt

    apply_style()
    counts = sorted({int(t) for where in points.values() for t, _ in where if t != "full"})
    order = [str(c) for c in counts] + (["full"] if any(t == "full" for w in points.values() for t, _ in w) else [])
    position = {t: i for i, t in enumerate(order)}
    colours = model_colours(sorted(points))
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(8.5, 4))
    for model in sorted(points):
        where = points[model]
        distances = sorted({d for _, d in where if d}, key=lambda d: math.inf if d == "inf" else float(d)) or [""]
        for i, distance in enumerate(distances):
            line = sorted(((t, e) for (t, d), e in where.items() if d in (distance, "")), key=lambda p: position[p[0]])
            rows = pd.DataFrame({"value": [e.value for _, e in line],
                                 "ci_low": [e.low if e.has_interval else math.nan for _, e in line],
                                 "ci_high": [e.high if e.has_interval else math.nan for _, e in line]})
            seeds = max(e.seeds for _, e in line)
            label = f"{model}" + (f", d={distance}" if distance else "") + (f" ({seeds} seeds)" if seeds > 1 else "")
            errorbar(ax, [position[t] for t, _ in line], rows, color=colours[model], marker="o",
                     linestyle=styles[i % len(styles)], label=label)
    ax.set_xticks(range(len(order)), order)
    ax.set(xlabel="pixel swaps T in training and test (full: one random permutation)", ylabel="test accuracy",
           title="Trained on swapped pixels (bars: 95% CI over seeds)", ylim=(0, 1.02))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    path = save_figure(fig, figure_dir / "train-swaps.png")
    return Figure("accuracy against train-time pixel swaps", image_uri(path),
                  "Each model trained and tested on pixels after T random swaps within distance d (the PiT paper's "
                  "experiment: the training settings permute_pixels, swaps T and swap_distance d); T = 0: natural "
                  "pixels, full: one fixed random permutation of all pixels. Bars: the 95% t interval of the mean over "
                  "training seeds (none where a model has one seed). Not the permutation probe's test-time swaps, "
                  "which perturb a model trained on natural pixels.")


def _summary_cell(column, estimate, group, at_chance: bool) -> dict[str, Any]:
    """One summary cell: the number at the digits its interval needs, the setting it quotes,
    or "does not apply" (grey, with why) where the probe ran, or "missing" where it did not."""
    from localitylab.probes.registry import probe_names
    from localitylab.report.judge import not_applicable_reason

    cell = {"key": column.key, "text": value_text(estimate, column.kind), "value": estimate.value if estimate else None,
            "interval": interval_text(estimate, column.kind), "low": estimate.low if estimate else None,
            "high": estimate.high if estimate else None, "missing": None, "na": None,
            "setting": estimate.setting if estimate else "", "chance": at_chance and column.key == "accuracy"}
    if estimate is None and column.probe is not None:
        reason = next((not_applicable_reason(column, r) for r in group.records if column.probe in r.tables), None)
        if reason is None and column.probe in probe_names() and group.first.config.get("task") == "diffusion":
            reason = _denoiser_reason(column.probe)
        if reason is None and column.probe in probe_names():
            cell["missing"] = probe_command(column.probe, group.first)
        else:
            cell["na"] = reason or "no value"
    elif estimate is None:
        cell["na"] = {"perm_gap": "needs the same recipe trained on permuted pixels"}.get(column.key, "not recorded")
    return cell


def _denoiser_reason(probe_name: str) -> str | None:
    from localitylab.probes.registry import get_probe

    probe = get_probe(probe_name)
    return None if probe.on_denoiser is not None else f"a denoiser: {probe.denoiser_reason}"


def build_context(records: list[RunRecord], title: str, figure_dir: Path,
                  expectations: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    from localitylab import __version__
    from localitylab.report.effects import PE_MOVED_MIN, SMALLEST_EFFECT
    from localitylab.report.judge import chance_of
    from localitylab.report.over_training import over_training_section
    from localitylab.report.reading import chance_sentence, locality_answer, pe_notes, reading

    groups = group_by_seed(records)
    rows = {group.name: summary_row(group, records) for group in groups}
    chance = {group.name: chance_of(group.records) for group in groups}
    at_chance = {name for name, c in chance.items() if c is not None and c.at_chance}
    # The Round 3 columns appear once some run's tables hold them.
    shown = [c for c in columns() if c.key not in EXTRA_KEYS or any(row.get(c.key) is not None for row in rows.values())]
    summary = [{"model": group.name, "seeds": len(group.records), "chance": group.name in at_chance,
                "cells": [_summary_cell(c, rows[group.name][c.key], group, group.name in at_chance) for c in shown]}
               for group in groups]
    sections = _probe_sections(records, figure_dir)
    missing = [(s.name, model, cmd) for s in sections for model, cmd in s.missing]
    reasons: dict[tuple[str, str], list[str]] = {}  # (model, why) -> the columns it explains
    for row in summary:
        for column, cell in zip(shown, row["cells"]):
            if cell["na"]:
                reasons.setdefault((row["model"], cell["na"]), []).append(column.label)
    not_applicable = [(model, ", ".join(labels), why) for (model, why), labels in reasons.items()]
    return {
        "title": title,
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "version": __version__,
        "columns": shown,
        "summary": summary,
        "models_count": len(groups),
        "reading": reading(rows, chance) + pe_notes(rows),
        "answer": locality_answer(groups, chance),
        "chance_sentence": chance_sentence(chance),
        "effects": sorted(SMALLEST_EFFECT.items()),
        "pe_moved_min": PE_MOVED_MIN,
        "not_applicable": not_applicable,
        "sections": sections,
        "generation": _generation_section(records),
        "records": records,
        # Models and Reproducibility show one run per seed group in full, and the other seeds' folders.
        "shown_records": [(group.first, [r.path.name for r in group.records[1:]]) for group in groups],
        "training_figure": _training_figure(groups, figure_dir),
        "swaps_figure": _train_swaps_figure(groups, figure_dir),
        "over_training": over_training_section(groups, figure_dir),
        "missing": missing,
        "expectations": expectations or [],
        "fmt": fmt,
        "row_text": row_text,
    }


def render_html(context: dict[str, Any]) -> str:
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("localitylab.report", "templates"),
                      autoescape=select_autoescape(["html", "j2"], default=True), trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html.j2").render(**context)


def build_report(run_dirs: list[str | Path], out: str | Path, title: str = "How much locality did each model learn?",
                 formats: tuple[str, ...] = FORMATS, expectations: list[dict[str, Any]] | None = None,
                 progress: Progress = SILENT) -> dict[str, Path]:
    """Write report.html and/or report.pdf into `out`; returns the paths written. `progress`
    counts the steps (reading the runs, the figures, each format)."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UserError(f"unknown report format {unknown[0] if unknown else ''!r}; valid: html, pdf")
    out = check_folder(out)
    with progress.task("report (steps)", total=2 + len(set(formats))) as task:
        records = collect_runs(list(run_dirs))
        task.advance()
        written: dict[str, Path] = {}
        with tempfile.TemporaryDirectory() as tmp:
            html = render_html(build_context(records, title, Path(tmp), expectations))
        task.advance()
        if "html" in formats:
            written["html"] = write_text(out / "report.html", html)
            task.advance()
        if "pdf" in formats:
            from weasyprint import HTML

            with atomic_path(out / "report.pdf") as tmp_pdf:
                HTML(string=html, base_url=str(out)).write_pdf(tmp_pdf)
            written["pdf"] = out / "report.pdf"
            task.advance()
    return written

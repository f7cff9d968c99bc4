"""Reports: every section and model, numbers equal to the tables, self-contained HTML,
escaped names, a PDF with numbered pages, and missing probes shown as missing."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from localitylab.probes import ProbeRequest, probe_names, read_table, run_probes
from localitylab.report import build_report
from localitylab.report.collect import collect_run
from tests.cli_helpers import run_command


class ReportParser(HTMLParser):
    """Collects section ids, summary cells (model, key) -> data-value, and visible text."""

    def __init__(self):
        super().__init__()
        self.sections, self.cells, self.models, self.text = [], {}, [], []
        self._model = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section" and "id" in attrs:
            self.sections.append(attrs["id"])
        if tag == "tr" and "data-model" in attrs:
            self._model = attrs["data-model"]
            self.models.append(self._model)
        if tag == "td" and "data-key" in attrs and self._model is not None:
            self.cells[(self._model, attrs["data-key"])] = attrs.get("data-value", "missing" if "missing" in attrs.get("class", "") else None)

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._model = None

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def probed_runs(trained_runs, tmp_path_factory):
    """Copies of the three trained nano runs with every probe run on 32 test images."""
    root = tmp_path_factory.mktemp("probed")
    folders = []
    for name, result in trained_runs.items():
        folder = root / result.run_dir.name
        shutil.copytree(result.run_dir, folder, ignore=shutil.ignore_patterns("probes"))
        run_probes(["all"], ProbeRequest(source=str(folder / "ckpt.pt"), n_images=32, batch_size=32, device="cpu"))
        folders.append(folder)
    return folders


@pytest.fixture(scope="module")
def report(probed_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    paths = build_report(probed_runs, out, title="Nano models on digits")
    parser = ReportParser()
    parser.feed(paths["html"].read_text())
    return paths, parser


def test_report_has_every_section_and_every_model(report, probed_runs):
    paths, parser = report
    expected_sections = {"summary", "models", "reproducibility"} | {f"probe-{p}" for p in probe_names()}
    assert expected_sections <= set(parser.sections)
    names = [collect_run(f).name for f in probed_runs]
    assert parser.models == names
    text = " ".join(parser.text)
    for name in names:
        assert text.count(name) >= 3  # summary, probe tables, models, reproducibility


def _table(folder: Path, probe: str) -> pd.DataFrame:
    return read_table(folder / "probes" / f"{probe}.csv")


def test_summary_numbers_equal_the_tables(report, probed_runs):
    _, parser = report
    for folder in probed_runs:
        name = collect_run(folder).name
        import json

        run = json.loads((folder / "run.json").read_text())
        assert float(parser.cells[(name, "accuracy")]) == run["metrics"]["test_acc"]
        assert int(parser.cells[(name, "params")]) == run["model_info"]["params"]
        perm = _table(folder, "permutation")
        drop = perm[(perm.metric == "accuracy_drop") & (perm.setting == "global")]["value"].iloc[0]
        assert float(parser.cells[(name, "global_drop")]) == pytest.approx(drop, abs=1e-12)
        erf = _table(folder, "receptive-field")
        r50 = erf[erf.metric == "erf_r50_frac"]
        assert float(parser.cells[(name, "erf_r50")]) == pytest.approx(r50[r50.layer == r50.layer.max()]["value"].iloc[0])
        attention = _table(folder, "attention-distance")
        ratios = attention[(attention.metric == "locality_ratio") & attention.value.notna()]
        if ratios.empty:  # a ConvNet: the probe says it does not apply, the summary shows no number
            assert parser.cells[(name, "ratio_first")] is None
        else:
            first = ratios[ratios.layer == ratios.layer.min()]["value"].mean()
            assert float(parser.cells[(name, "ratio_first")]) == pytest.approx(first, rel=1e-12)
        pe = _table(folder, "pe-similarity")
        spearman = pe[(pe.metric == "pe_distance_spearman") & pe.value.notna()]
        if not spearman.empty:
            assert float(parser.cells[(name, "pe_spearman")]) == pytest.approx(spearman["value"].iloc[0])


def test_pdf_has_the_same_numbers_and_numbered_pages(report, probed_runs):
    from pypdf import PdfReader

    paths, parser = report
    reader = PdfReader(paths["pdf"])
    pages = [page.extract_text() for page in reader.pages]
    assert 3 <= len(pages) <= 60
    for i, text in enumerate(pages, start=1):
        assert f"page {i} of {len(pages)}" in text
    text = " ".join(pages)
    for folder in probed_runs:
        record = collect_run(folder)
        assert record.name in text
        assert f"{100 * record.accuracy:.1f}%" in text


def test_pdf_renders_to_png(report, tmp_path):
    if shutil.which("pdftoppm") is None:
        pytest.skip("pdftoppm (Debian poppler-utils) is not installed; CI installs it")
    paths, _ = report
    subprocess.run(["pdftoppm", "-png", "-r", "40", "-f", "1", "-l", "2", str(paths["pdf"]), str(tmp_path / "page")],
                   check=True, timeout=120)
    pngs = sorted(tmp_path.glob("page*.png"))
    assert len(pngs) == 2 and all(p.stat().st_size > 2000 for p in pngs)


def test_html_is_self_contained(report):
    paths, _ = report
    page = paths["html"].read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page, re.I)
    assert not re.search(r"url\(\s*['\"]?(https?:|//)", page, re.I)
    assert "<link" not in page and "@import" not in page and "<script" not in page
    assert page.count("data:image/png;base64,") >= len(probe_names())


def test_user_supplied_names_are_escaped(trained_runs, tmp_path):
    hostile = "<img src=x onerror=alert(1)>"
    folder = tmp_path / hostile
    shutil.copytree(trained_runs["resnet-n"].run_dir, folder, ignore=shutil.ignore_patterns("probes"))
    title = "<script>alert(1)</script>"
    paths = build_report([folder], tmp_path / "out", title=title, formats=("html",))
    page = paths["html"].read_text()
    assert title not in page and hostile not in page
    assert html.escape(title) in page and html.escape(hostile, quote=False) in page


def test_a_missing_probe_is_shown_as_missing_with_its_command(probed_runs, tmp_path):
    folder = tmp_path / "partial"
    shutil.copytree(probed_runs[0], folder)
    (folder / "probes" / "receptive-field.csv").unlink()
    paths = build_report([folder], tmp_path / "out", formats=("html",))
    parser = ReportParser()
    parser.feed(paths["html"].read_text())
    name = collect_run(folder).name
    assert parser.cells[(name, "erf_r50")] == "missing"
    assert f"localitylab probe receptive-field {folder / 'ckpt.pt'}" in html.unescape(paths["html"].read_text())
    assert "missing" in parser.sections


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def console_messages(page: Path, tmp_path: Path) -> tuple[list[str], Path]:
    shot = tmp_path / "shot.png"
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--window-size=1280,2400", "--virtual-time-budget=3000", f"--screenshot={shot}", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    return [line for line in result.stderr.splitlines() if "CONSOLE" in line], shot


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian package 'chromium'); CI installs it")
def test_html_opens_in_chromium_without_console_errors(report, tmp_path):
    # First prove the harness sees console errors at all, then look at the report.
    canary = tmp_path / "canary.html"
    canary.write_text("<html><body><script>console.error('canary-error')</script></body></html>")
    seen, _ = console_messages(canary, tmp_path / "a")
    assert any("canary-error" in line for line in seen), "the harness cannot see console messages"
    paths, _ = report
    messages, shot = console_messages(paths["html"], tmp_path / "b")
    assert messages == []
    assert shot.stat().st_size > 10000


def test_report_cli_bad_input_is_one_line(tmp_path):
    result = run_command("report", tmp_path / "nope", "--out", tmp_path / "o")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_runs_that_differ_only_in_seed_are_one_row_with_mean_spread_and_bands(probed_runs, tmp_path):
    """Three runs of one recipe under three training seeds (copies of a probed run, re-labelled
    with known accuracies): one summary row, the mean ± sd of the accuracies, the t interval
    of the mean (cut at 1) as its bounds, and the training curves drawn as a mean with a band."""
    import json
    import statistics

    from scipy.stats import t

    source = next(folder for folder in probed_runs if folder.name.startswith("pit-n"))
    accuracies = [0.5, 0.6, 0.8]
    folders = []
    for seed, accuracy in enumerate(accuracies):
        folder = tmp_path / f"pit-run-s{seed}"
        shutil.copytree(source, folder)
        run = json.loads((folder / "run.json").read_text())
        run["config"]["seed"], run["metrics"]["test_acc"] = seed, accuracy
        (folder / "run.json").write_text(json.dumps(run))
        folders.append(folder)
    html_path = build_report([*folders, *[f for f in probed_runs if f != source]], tmp_path / "report",
                             formats=("html",))["html"]
    parser = ReportParser()
    parser.feed(html_path.read_text())
    grouped = "pit-n (pit-run, 3 seeds)"
    assert grouped in parser.models and len(parser.models) == len(probed_runs)  # three runs, one row
    mean, sd = statistics.fmean(accuracies), statistics.stdev(accuracies)
    assert float(parser.cells[(grouped, "accuracy")]) == pytest.approx(mean)
    page = html_path.read_text()
    row = page[page.index(f'data-model="{grouped}"'):]
    half = t.ppf(0.975, 2) * sd / 3 ** 0.5
    low, high = (float(v) for v in re.search(r'data-key="accuracy" data-value="[^"]+" data-low="([^"]+)" '
                                             r'data-high="([^"]+)"', row).groups())
    assert mean + half > 1  # the t interval passes 1: the report cuts it there (an accuracy)
    assert (low, high) == pytest.approx((mean - half, 1.0))
    assert f"± {100 * sd:.1f}% sd, 3 seeds" in row[:row.index("</tr>")]
    assert "a band for the 95% t interval of that mean at each epoch" in page


def test_seed_intervals_are_the_t_interval_cut_to_the_metrics_range():
    """Over 3 seeds, each row's interval is mean ± t(0.975, 2)·sd/√3 (scipy's t interval,
    computed apart), cut where the metric cannot go: an ERF radius (in pixels or as a fraction
    of the side) stays >= 0, an accuracy and a drop of accuracy <= 1; an R² keeps its whole
    interval, below 0 included."""
    import numpy as np
    from scipy import stats

    from localitylab.probes import COLUMNS
    from localitylab.report.summary import Estimate, over_seeds, over_seeds_table

    seeds = {"erf_r50_px": [0.5, 0.6, 6.0], "erf_r50_frac": [0.05, 0.06, 0.6], "accuracy": [0.99, 1.0, 0.9],
             "accuracy_drop": [0.99, 0.9, 0.7], "pe_linear_r2": [0.5, 0.6, 6.0]}
    tables = [pd.DataFrame([{**dict.fromkeys(COLUMNS), "model": "m", "probe": "p", "metric": metric, "value": values[i],
                             "n_images": 8} for metric, values in seeds.items()], columns=COLUMNS) for i in range(3)]
    merged = over_seeds_table(tables, "m").set_index("metric")
    for metric, values in seeds.items():
        low, high = stats.t.interval(0.95, 2, loc=np.mean(values), scale=stats.sem(values))
        assert merged.loc[metric, "value"] == pytest.approx(np.mean(values))
        if metric.startswith("erf_r50"):
            assert low < 0 and merged.loc[metric, "ci_low"] == 0.0 and merged.loc[metric, "ci_high"] == pytest.approx(high)
        elif metric.startswith("accuracy"):  # an accuracy, or a drop of one, is at most 1
            assert high > 1 and merged.loc[metric, "ci_high"] == 1.0 and merged.loc[metric, "ci_low"] == pytest.approx(low)
        else:
            assert (merged.loc[metric, "ci_low"], merged.loc[metric, "ci_high"]) == pytest.approx((low, high))
    radius = over_seeds([Estimate(v) for v in seeds["erf_r50_px"]], (0.0, float("inf")))
    assert radius.low == 0.0 and radius.seeds == 3 and radius.spread == pytest.approx(np.std(seeds["erf_r50_px"], ddof=1))


@pytest.mark.parametrize("intervals, expect", [
    # (value, low, high) per model; the ERF column ranks low as more local
    ({"a": (0.10, 0.05, 0.15), "b": (0.50, 0.45, 0.55), "c": (0.60, 0.52, 0.70)}, "a first"),
    ({"a": (0.10, 0.00, 0.30), "b": (0.15, 0.05, 0.40), "c": (0.20, 0.10, 0.35)}, "indistinguishable"),
    ({"a": (0.10, 0.00, 0.33), "b": (0.13, 0.00, 0.28), "c": (0.60, 0.51, 0.70)}, "c behind"),
    ({"a": (0.30, 0.00, 1.00), "b": (0.10, 0.05, 0.15), "c": (0.60, 0.55, 0.65)}, "c behind"),
    ({"a": (0.10, 0.00, 1.00), "b": (0.20, 0.15, 0.25), "c": (0.60, 0.55, 0.65)}, "pairs"),
])
def test_the_reading_says_what_the_intervals_separate(intervals, expect):
    """The demo's ERF column: two ConvNets' intervals lay clear of the transformers', whose own
    overlapped; the sentence called all six indistinguishable. It may say so only where every two
    intervals overlap, and names a first only where its interval is clear of every other."""
    from localitylab.report.reading import reading
    from localitylab.report.summary import Estimate

    rows = {name: {"erf_r50": Estimate(*numbers)} for name, numbers in intervals.items()}
    sentence = next(s for s in reading(rows) if s.startswith("ERF") or "receptive field" in s)
    if expect == "a first":
        assert sentence.startswith("a has the tightest") and "separated from every other" in sentence
    elif expect == "indistinguishable":
        assert "indistinguishable" in sentence
    elif expect == "c behind":
        assert "indistinguishable" not in sentence and "no model is separated" in sentence
        overlapping, behind = sentence.split("Behind them")
        assert "a " in overlapping and "b " in overlapping and "c " not in overlapping and "c 0.6" in behind
    else:
        assert "indistinguishable" not in sentence and "Some pairs among them are separated" in sentence


def test_seeds_that_agree_keep_the_interval_of_their_shared_images():
    """Three seeds probed on the same 64 images gave one accuracy drop, 0.786, three times:
    the t interval over seeds has zero width, but the images were drawn once for all three.
    The interval over seeds adds the runs' mean half-width over images in quadrature, in the
    summary (over_seeds) and in the merged tables (over_seeds_table) alike."""
    import numpy as np
    from scipy import stats

    from localitylab.probes import COLUMNS
    from localitylab.report.summary import Estimate, over_seeds, over_seeds_table

    runs = [(0.786, 0.667, 0.891), (0.786, 0.677, 0.885), (0.786, 0.656, 0.891)]
    image_half = np.mean([(high - low) / 2 for _, low, high in runs])
    agreed = over_seeds([Estimate(*run) for run in runs], (-1.0, 1.0))
    assert agreed.spread == 0 and agreed.high - agreed.low == pytest.approx(2 * image_half)

    drops = [0.70, 0.79, 0.85]
    seed_half = stats.t.ppf(0.975, 2) * stats.sem(drops)
    tables = [pd.DataFrame([{**dict.fromkeys(COLUMNS), "model": "m", "probe": "permutation", "metric": "accuracy_drop",
                             "setting": "global", "value": value, "ci_low": value - 0.1, "ci_high": value + 0.1,
                             "n_images": 64}], columns=COLUMNS) for value in drops]
    merged = over_seeds_table(tables, "m").iloc[0]
    expected = np.hypot(seed_half, 0.1)
    assert (merged["ci_low"], merged["ci_high"]) == pytest.approx((np.mean(drops) - expected, np.mean(drops) + expected))
    summary = over_seeds([Estimate(v, v - 0.1, v + 0.1) for v in drops], (-1.0, 1.0))
    assert (summary.low, summary.high) == pytest.approx((merged["ci_low"], merged["ci_high"]))


def test_seeds_that_differ_only_in_settings_that_do_not_define_a_run_are_one_experiment(tmp_path):
    """Which settings do not define a run is TrainConfig's (`defines_run`): two seeds of one
    recipe, one logged to tensorboard and one not, one typed, the other from the data set's
    defaults, are one experiment; a setting that defines the run (lr) keeps them apart."""
    from localitylab.report.collect import RunRecord
    from localitylab.report.summary import NOT_THE_RECIPE, group_by_seed
    from localitylab.train.config import TrainConfig

    assert {"log", "cache", "weights", "recipe_from", "out", "device"} <= set(NOT_THE_RECIPE)
    assert not {"lr", "epochs", "model_kw", "seed"} & set(NOT_THE_RECIPE)

    def record(seed: int, **settings) -> RunRecord:
        config = TrainConfig("pit-n", "digits", seed=seed, out=tmp_path / f"s{seed}", **settings).to_dict()
        return RunRecord(path=tmp_path / f"pit-n-s{seed}", name=f"pit-n (s{seed})", spec={"name": "pit-n"},
                         data="digits", config=config)

    same = group_by_seed([record(0), record(1, log="tensorboard", cache=False, batch_size=32)])
    assert [len(group.records) for group in same] == [2]
    apart = group_by_seed([record(0), record(1, lr=0.01)])
    assert [len(group.records) for group in apart] == [1, 1]


# --- issue 28: reports that cannot mislead ---------------------------------------------------------
def _fabricated_run(root: Path, folder: str, spec_name: str, accuracy: float, clean: tuple, permutation: dict,
                    attention: list | None = None, erf: dict | None = None, pe: dict | None = None) -> Path:
    """A run folder written the way training and the probes write one, with chosen numbers."""
    import json

    from localitylab.probes import COLUMNS

    path = root / folder
    (path / "probes").mkdir(parents=True)
    name = f"{spec_name} ({folder})"
    (path / "run.json").write_text(json.dumps({
        "model_spec": {"name": spec_name, "num_classes": 10, "img_size": 8, "in_chans": 1}, "data": "digits",
        "config": {"seed": 0, "epochs": 3, "task": "classify"}, "metrics": {"test_acc": accuracy, "epoch": 3},
        "model_info": {"params": 1000}}))

    def row(probe, metric, value, low=None, high=None, layer=None, setting=None, note=None, n=64):
        return dict(model=name, probe=probe, metric=metric, layer=layer, head=None, setting=setting, value=value,
                    ci_low=low, ci_high=high, n_images=n, note=note)

    tables = {"permutation": [row("permutation", "accuracy", *clean, setting="clean")]
              + [row("permutation", m, *v, setting="global") for m, v in permutation.items()],
              "receptive-field": [row("receptive-field", m, *v, layer=1) for m, v in (erf or {}).items()],
              "attention-distance": ([row("attention-distance", "locality_ratio", *v, layer=i) for i, v in enumerate(attention)]
                                     if attention else [row("attention-distance", "locality_ratio", None,
                                                            note=f"{spec_name} has no attention layers", n=0)])}
    if pe:
        tables["pe-similarity"] = [row("pe-similarity", m, v, n=0) for m, v in pe.items()]
    for probe, rows in tables.items():
        pd.DataFrame(rows, columns=COLUMNS).to_csv(path / "probes" / f"{probe}.csv", index=False)
    (path / "probes" / "meta.json").write_text(json.dumps(
        {"model": name, "probes": {p: {"data": "digits", "artifacts": [], "versions": {}} for p in tables}}))
    return path


def _visible_text(page: str) -> str:
    parser = ReportParser()
    parser.feed(page)
    return re.sub(r"\s+", " ", " ".join(parser.text))


def test_a_model_at_chance_is_marked_and_ranked_nowhere(tmp_path):
    """pit-n at 10% on ten classes (interval over chance) beside two trained models, with the
    audit's numbers: an ERF radius 0 [0, 0] and a zero drop that would otherwise top or trail
    the rankings. It is named at chance in the summary's first sentence and in its row, and no
    ranking sentence mentions it."""
    chance_run = _fabricated_run(tmp_path, "pit-chance", "pit-n", 0.10, (0.10, 0.05, 0.16),
                                 {"accuracy_drop": (0.0, -0.05, 0.05)}, attention=[(0.90, 0.88, 0.92)],
                                 erf={"erf_r50_frac": (0.0, -0.01, 0.01)})
    vit = _fabricated_run(tmp_path, "vit-trained", "vit-n/2", 0.875, (0.875, 0.80, 0.93),
                          {"accuracy_drop": (0.766, 0.70, 0.83)}, attention=[(0.80, 0.78, 0.82)],
                          erf={"erf_r50_frac": (0.10, 0.09, 0.11)})
    resnet = _fabricated_run(tmp_path, "resnet-trained", "resnet-n", 0.797, (0.797, 0.72, 0.86),
                             {"accuracy_drop": (0.698, 0.62, 0.77)}, erf={"erf_r50_frac": (0.30, 0.25, 0.35)})
    page = build_report([chance_run, vit, resnet], tmp_path / "out", formats=("html",))["html"].read_text()
    parser = ReportParser()
    parser.feed(page)
    answer = html.unescape(re.search(r'<p class="answer">(.*?)</p>', page, re.S).group(1))
    first_sentence = answer.split(". ")[0]
    assert "at chance" in first_sentence.lower() and "pit-n (pit-chance)" in first_sentence
    row = page[page.index('data-model="pit-n (pit-chance)"'):]
    assert "at chance" in row[:row.index("</tr>")]
    sentences = re.findall(r"<li>(.*?)</li>", page[page.index('<ul class="reading">'):], re.S)
    ranking = [html.unescape(s) for s in sentences if "separated" in s or "indistinguishable" in s or "Not ranked" in s]
    assert ranking, "the two trained models are still compared"
    assert all("pit-chance" not in s for s in ranking)
    assert "pit-chance" not in answer.split(". ", 1)[1]  # only the chance sentence names it


def test_raw_drops_are_not_ranked_and_order_dependence_is():
    """Two models lose the same 0.4 of accuracy under a global shuffle, one from 0.9, one from
    0.5 (chance 0.1): the raw drops are shown with their cap and not ranked; the normalised
    measure, (clean - shuffled) / (clean - chance) = 0.5 against 1.0, ranks them."""
    from localitylab.report.judge import Chance
    from localitylab.report.reading import reading
    from localitylab.report.summary import Estimate

    chance = {"a": Chance(0.1, 0.9, 0.85, 0.95), "b": Chance(0.1, 0.5, 0.45, 0.55)}
    drops = {"a": {"global_drop": Estimate(0.4, 0.35, 0.45)}, "b": {"global_drop": Estimate(0.4, 0.35, 0.45)}}
    raw = next(s for s in reading(drops, chance) if "global shuffle" in s)
    assert "Not ranked" in raw and "capped at 0.8 " in raw and "capped at 0.4 " in raw  # the caps: 0.9-0.1, 0.5-0.1
    normalised = {name: {**row, "order_global": Estimate(value, value - 0.05, value + 0.05)}
                  for (name, row), value in zip(drops.items(), (0.5, 1.0))}
    ranked = [s for s in reading(normalised, chance) if "global shuffle" in s]
    assert len(ranked) == 1 and ranked[0].startswith("b depends most on pixel order")


def test_radii_fixed_by_patch_geometry_are_not_called_tightest():
    """The audit's case: a PiT's last-block r50 is 0 [0, 0] by construction (the field sits on
    its own pixel); the reading says geometry decides and names no tightest field."""
    from localitylab.report.reading import reading
    from localitylab.report.summary import Estimate

    rows = {"pit": {"erf_r50": Estimate(0.0, 0.0, 0.0)}, "vit": {"erf_r50": Estimate(0.0884, 0.0884, 0.0884)},
            "resnet": {"erf_r50": Estimate(0.3, 0.25, 0.35)}}
    sentence = next(s for s in reading(rows) if s.startswith("ERF"))
    assert "tightest" not in sentence and "patch geometry alone decides" in sentence


def test_locality_within_the_smallest_effect_is_no_meaningful_locality(tmp_path):
    """A ratio of 0.998 [0.9977, 0.9987] excludes 1 but is 0.2% from it: "no meaningful
    locality"; 0.80 [0.78, 0.82] is local. The threshold is printed in the report."""
    from localitylab.report.effects import SMALLEST_EFFECT

    faint = _fabricated_run(tmp_path, "vit-faint", "vit-n/2", 0.51, (0.51, 0.45, 0.57), {},
                            attention=[(0.998, 0.9977, 0.9987)])
    local = _fabricated_run(tmp_path, "vit-local", "vit-n/2", 0.9, (0.9, 0.85, 0.95), {}, attention=[(0.80, 0.78, 0.82)])
    page = html.unescape(build_report([faint, local], tmp_path / "out", formats=("html",))["html"].read_text())
    answer = re.search(r'<p class="answer">(.*?)</p>', page, re.S).group(1)
    assert "No meaningful locality" in answer and "0.9980 [0.9977, 0.9987]" in answer
    assert re.search(r"Local \(.*vit-local", answer) and not re.search(r"Local \([^.]*vit-faint", answer)
    assert f"locality_ratio {SMALLEST_EFFECT['locality_ratio']}" in page


def test_a_value_and_interval_differing_in_the_fourth_figure_print_differently():
    from localitylab.report.numbers import fmt_interval

    value, interval = fmt_interval(1.00251, 1.00242, 1.00260)
    low, high = interval.strip("[]").split(", ")
    assert len({value, low, high}) == 3 and float(value) == pytest.approx(1.00251, abs=5e-5)
    assert fmt_interval(0.5, 0.5, 0.5) == ("0.500", "[0.500, 0.500]")  # equal numbers print equal
    assert fmt_interval(0.766, 0.70, 0.83) == ("0.766", "[0.700, 0.830]")  # no more digits than needed


def test_a_table_that_barely_moved_is_said_to_describe_its_initialisation():
    from localitylab.report.reading import pe_notes
    from localitylab.report.summary import Estimate

    notes = pe_notes({"pit": {"pe_moved": Estimate(0.03)}, "vit": {"pe_moved": Estimate(0.5)}, "resnet": {}})
    assert len(notes) == 1 and notes[0].startswith("pit") and "describe its initialisation" in notes[0]


def test_a_demo_like_pdf_fits_its_summary_and_has_at_most_40_pages(probed_runs, tmp_path):
    """The demo's shape: three models, each trained on natural and on permuted pixels, three
    seeds each (18 runs, 6 summary rows), here copies of the probed runs relabelled. Every
    summary column's header is in the PDF's text (a column cut at the page edge is not), the
    header counts 6 models, and the PDF has at most 40 pages (the committed demo had 188)."""
    import json

    from pypdf import PdfReader

    folders = []
    for source in probed_runs:
        for permuted in (False, True):
            for seed in range(3):
                folder = tmp_path / "runs" / f"{source.name}-s{seed}{'-perm0' if permuted else ''}"
                shutil.copytree(source, folder)
                run = json.loads((folder / "run.json").read_text())
                run["config"]["seed"] = seed
                if permuted:
                    run["config"]["permute_pixels"], run["permute_seed"] = 0, 0
                (folder / "run.json").write_text(json.dumps(run))
                folders.append(folder)
    paths = build_report(folders, tmp_path / "out")
    page = paths["html"].read_text()
    assert "6 models from 18 runs" in page
    pages = PdfReader(paths["pdf"]).pages
    text = re.sub(r"\s+", " ", " ".join(p.extract_text() for p in pages))
    headers = re.findall(r'<th class="num" title="[^"]*">([^<]+)</th>', page)
    assert len(headers) >= 10
    for header in headers:
        assert all(word in text for word in html.unescape(header).split()), header
    assert len(pages) <= 40


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian package 'chromium'); CI installs it")
def test_html_needs_no_horizontal_scroll_at_1280_px(report, tmp_path):
    """In Chromium at a 1280 px window, the document and every table are no wider than the
    viewport. A copy of the page carries a script that writes the widths into the DOM (the
    report itself has no script); --dump-dom reads them back."""
    paths, _ = report
    probe = tmp_path / "widths.html"
    script = ("<script>window.addEventListener('load', () => { const d = document.documentElement;"
              " const widest = Math.max(0, ...[...document.querySelectorAll('table')].map(t => t.getBoundingClientRect().right));"
              " document.body.setAttribute('data-widths', d.scrollWidth + ',' + d.clientWidth + ',' + Math.ceil(widest)); });"
              "</script></body>")
    probe.write_text(paths["html"].read_text().replace("</body>", script))
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--window-size=1280,900", "--virtual-time-budget=3000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120)
    scroll, client, widest = map(int, re.search(r'data-widths="(\d+),(\d+),(\d+)"', result.stdout).groups())
    assert client <= 1280 and scroll <= client and widest <= client

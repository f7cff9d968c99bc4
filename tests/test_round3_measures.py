"""The Round 3 measures (docs/probes.md): order dependence, the continuous ERF measures and
where a 1x1 stage's field sits, and how far a position table moved."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn

from localitylab.probes import Measurements, get_probe
from localitylab.probes.api import memory_target
from localitylab.probes.order_dependence import order_dependence_resampler, order_dependence_rows

SIDE = 8
CLASSES = 10


class ScriptedClassifier(nn.Module):
    """Predictions chosen per image: channel 1 holds the image's index (constant, so it
    survives any shuffle), channel 0 a raster ramp that is in order only on the clean image.
    In order: `clean[index]`; shuffled: `shuffled[index]`."""

    def __init__(self, clean: list[int], shuffled: list[int]) -> None:
        super().__init__()
        self.num_classes = CLASSES
        self.register_buffer("clean", torch.tensor(clean))
        self.register_buffer("shuffled", torch.tensor(shuffled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = x[:, 0].flatten(1)
        in_order = (ramp.diff(dim=1) > 0).all(dim=1)
        index = x[:, 1].mean(dim=(1, 2)).round().long()
        prediction = torch.where(in_order, self.clean[index], self.shuffled[index])
        return nn.functional.one_hot(prediction, CLASSES).float()


def scripted_images(count: int) -> torch.Tensor:
    ramp = torch.arange(SIDE * SIDE, dtype=torch.float32).view(1, 1, SIDE, SIDE).expand(count, 1, SIDE, SIDE)
    index = torch.arange(count, dtype=torch.float32).view(count, 1, 1, 1).expand(count, 1, SIDE, SIDE)
    return torch.cat([ramp, index], dim=1).contiguous()


def scripted_table(clean_right: int, shuffled_right: int, count: int = 100):
    """A model right on the first `clean_right` clean images and the first `shuffled_right`
    shuffled ones (labels cycle through the classes)."""
    labels = torch.arange(count) % CLASSES
    wrong = (labels + 1) % CLASSES
    clean = torch.where(torch.arange(count) < clean_right, labels, wrong)
    shuffled = torch.where(torch.arange(count) < shuffled_right, labels, wrong)
    images = scripted_images(count)
    target = memory_target(ScriptedClassifier(clean.tolist(), shuffled.tolist()), images, "prepared")
    options = {"window_sizes": [], "tile_grids": [], "swap_fractions": [], "draws": 2}
    table = get_probe("permutation").run(target, images, labels, options, 50, seed=0).table
    return table.set_index(["metric", "setting"])


def test_order_dependence_tells_apart_models_with_the_same_drop():
    """Both lose 0.4 under a global shuffle; from 0.9 that is half the headroom above chance
    (0.1), from 0.5 all of it."""
    high, low = scripted_table(90, 50), scripted_table(50, 10)
    for table in (high, low):
        assert table.loc[("accuracy_drop", "global"), "value"] == pytest.approx(0.4)
    assert high.loc[("order_dependence", "global"), "value"] == pytest.approx(0.5)
    assert low.loc[("order_dependence", "global"), "value"] == pytest.approx(1.0)
    for table, value in ((high, 0.5), (low, 1.0)):
        row = table.loc[("order_dependence", "global")]
        assert row["ci_low"] <= value <= row["ci_high"] and row["ci_high"] > row["ci_low"]
    # separated by their paired intervals
    assert high.loc[("order_dependence", "global"), "ci_high"] < low.loc[("order_dependence", "global"), "ci_low"]


def test_order_dependence_is_empty_at_chance():
    table = scripted_table(10, 0)
    clean = table.loc[("accuracy", "clean")]
    assert clean["ci_low"] <= 0.1 <= clean["ci_high"]
    row = table.loc[("order_dependence", "global")]
    assert pd_isna(row["value"]) and pd_isna(row["ci_low"]) and "includes chance" in row["note"]
    assert table.loc[("accuracy_drop", "global"), "value"] == pytest.approx(0.1)  # the raw drop stays


def pd_isna(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def test_order_dependence_resamples_agree_with_a_direct_computation():
    rng = np.random.default_rng(1)
    clean = rng.integers(0, 2, 9).astype(float)
    altered = rng.integers(0, 2, (3, 9)).astype(float)
    indices = rng.integers(0, 9, (50, 9))
    got = order_dependence_resampler(clean, altered, 0.25, seed=7)(indices)[0]
    draws = np.random.default_rng(7).integers(0, 3, (50, 3))
    for b in range(50):
        c = clean[indices[b]].mean()
        a = np.mean([altered[d][indices[b]].mean() for d in draws[b]])
        expected = (c - a) / (c - 0.25) if c != 0.25 else np.nan
        assert got[b] == pytest.approx(expected, nan_ok=True)


def test_order_dependence_interval_matches_the_exact_bootstrap_distribution():
    """Six images, one draw: every one of the 6^6 resamples, enumerated, gives the exact
    bootstrap distribution; the probe's 2,000-resample percentile interval sits at its 2.5%
    and 97.5% quantiles (within Monte Carlo error)."""
    clean = np.array([1, 1, 1, 1, 0, 1], dtype=float)
    altered = np.array([[0, 1, 0, 0, 0, 1]], dtype=float)
    chance = 0.1
    every = np.array(list(itertools.product(range(6), repeat=6)))
    exact = order_dependence_resampler(clean, altered, chance, seed=0)(every)[0]
    out = Measurements()
    out.per_image("accuracy", torch.tensor(clean), setting="clean")
    order_dependence_rows(out, torch.tensor(clean), torch.tensor(altered), chance, "global", 0, "")
    out.add_intervals(3)
    row = out.rows[-1]
    assert row.value == pytest.approx((5 / 6 - 2 / 6) / (5 / 6 - 0.1))
    low, high = row.interval
    assert np.quantile(exact, 0.01) <= low <= np.quantile(exact, 0.05)
    assert np.quantile(exact, 0.95) <= high <= np.quantile(exact, 0.99)


# --- the continuous ERF measures and the location of a 1x1 stage -------------------------------------
def _ones_stack(kernel: int, stride: int, padding: int, depth: int) -> nn.Sequential:
    convs = [nn.Conv2d(1, 1, kernel, stride=stride, padding=padding, bias=False) for _ in range(depth)]
    for conv in convs:
        nn.init.ones_(conv.weight)
    return nn.Sequential(*convs).eval()


def _erf(stack: nn.Sequential, size: int):
    from localitylab.probes.receptive_field import effective_receptive_field_locations, layer_feature_maps

    return effective_receptive_field_locations(layer_feature_maps(stack), torch.randn(3, 1, size, size), 2)


def _last_row(table, metric):
    rows = table[table["metric"] == metric]
    return rows[rows["layer"] == rows["layer"].max()].iloc[0]


def test_outside_token_and_area_of_linear_stacks_in_closed_form():
    from localitylab.probes.erf_geometry import area_ratios, outside_cell

    # Two 3x3 stride-1 convolutions: the field is (1 2 3 2 1)^T (1 2 3 2 1) around the centre
    # pixel, whose own cell is that pixel: 9 of 81 paths end on it.
    maps, locations = _erf(_ones_stack(3, 1, 1, 2), 16)
    flat = maps[-1].reshape(1, -1).numpy()
    assert outside_cell(flat, (16, 16), locations[-1].cell)[0] == pytest.approx(1 - 9 / 81)
    # The 50% area: the fewest pixels, largest weights first, holding 40.5 of the 81 paths.
    weights = sorted((a * b for a in (1, 2, 3, 2, 1) for b in (1, 2, 3, 2, 1)), reverse=True)
    needed = next(i + 1 for i in range(25) if sum(weights[:i + 1]) >= 0.5 * 81)
    assert area_ratios(flat, (0.5,))[0, 0] == pytest.approx(needed / 256)
    # Three 2x2 stride-2 convolutions (a patchify stem of 8): each location's field is its own
    # 8x8 patch, uniform: nothing outside, and 50% of the mass on 32 of the image's 1024 pixels.
    maps, locations = _erf(_ones_stack(2, 2, 0, 3), 32)
    flat = maps[-1].reshape(1, -1).numpy()
    assert locations[-1].cell == (16.0, 16.0, 24.0, 24.0)
    assert outside_cell(flat, (32, 32), locations[-1].cell)[0] == pytest.approx(0.0, abs=1e-12)
    assert area_ratios(flat, (0.2, 0.3, 0.5, 0.99))[:, 0] == pytest.approx(np.array([13, 20, 32, 64]) / 1024)


def _direct_area_ratios(maps, fractions):
    """The definition as written: decreasing mass, cumulative share, first pixel past it."""
    count, totals = maps.shape[1], maps.sum(axis=1)
    cumulative = np.cumsum(-np.sort(-maps, axis=1), axis=1) / np.where(totals > 0, totals, 1.0)[:, None]
    direct = np.stack([((cumulative < f - 1e-9).sum(axis=1) + 1).clip(max=count) / count for f in fractions])
    direct[:, ~(totals > 0)] = np.nan
    return direct


def test_binned_area_ratios_equal_the_direct_definition():
    """The bootstrap's area ratios (each map binned by its values' leading bits, only the
    boundary's bin sorted) are the definition's on maps that stress the bins: ties, zeros,
    -0.0, a uniform map, values over 300 factors of 2, and a map with negative values."""
    from localitylab.probes.area_ratio import area_ratios, sorted_area_ratios

    rng = np.random.default_rng(0)
    maps = rng.random((24, 300)) ** 4
    maps[3] = 0.0  # an all-zero map: NaN
    maps[5, :200] = 0.0  # ties at zero
    maps[6, ::2] = -0.0  # its sign bit set
    maps[7] = 1.0  # a uniform map: ties everywhere
    maps[8] = 2.0 ** -rng.integers(0, 300, 300)  # values far below the top bin's 40 factors of 2
    maps[9, :5] = -maps[9, :5]  # negative values: the sorted path
    maps[10] = rng.integers(0, 3, 300).astype(float)  # a few tied levels
    fractions = (0.2, 0.3, 0.5, 0.99, 1.0)
    expected = _direct_area_ratios(maps, fractions)
    np.testing.assert_array_equal(area_ratios(maps, fractions), expected)
    np.testing.assert_array_equal(sorted_area_ratios(maps, fractions), expected)
    assert np.isnan(expected[:, 3]).all() and not np.isnan(expected[:, 4:]).any()


def test_an_area_boundary_among_values_below_the_binned_range():
    """One large pixel and 100,000 faint ones at 1e-13 and 3e-14 of it (below the 2**-40 the
    bins resolve: they share the lowest bin, sorted like any other). The count is the exact
    one (sums by math.fsum); the sorted running sum drifts here, adding each faint value to 1."""
    import math

    from localitylab.probes.area_ratio import area_ratios

    faint = np.full(100_000, 1e-13)
    faint[::3] = 3e-14
    row = np.concatenate([[1.0], faint])
    ordered = np.sort(row)[::-1].tolist()
    total = math.fsum(ordered)

    def exact(fraction):  # the fewest largest pixels whose exact sum reaches the share
        low, high = 1, len(ordered)
        while low < high:
            mid = (low + high) // 2
            low, high = (low, mid) if math.fsum(ordered[:mid]) / total >= fraction - 1e-9 else (mid + 1, high)
        return low / len(ordered)

    assert area_ratios(row[None], (0.99, 1.0))[:, 0].tolist() == [exact(0.99), exact(1.0)]
    assert exact(0.99) == 1 / len(ordered) and 0.6 < exact(1.0) < 0.7
    assert _direct_area_ratios(row[None], (1.0,))[0, 0] > exact(1.0)  # the drift: 178 pixels too many


def test_a_one_by_one_stage_is_measured_at_its_true_centre():
    """Three 3x3 stride-2 convolutions take 8x8 to 1x1: the one location sits at pixel
    (0.5, 0.5) by convolution arithmetic (not the image centre), its cell is the 8x8 stride
    cell around it (clipped to the image: pixels 0..3 whole, 4 half), and the note says so."""
    from localitylab.probes.erf_geometry import cell_overlap

    maps, locations = _erf(_ones_stack(3, 2, 1, 3), 8)
    last = locations[-1]
    assert last.centre == (0.5, 0.5) and (last.row, last.col) == (0, 0)
    assert "1x1 map" in last.note and "(0.5, 0.5)" in last.note and "convolution arithmetic" in last.note
    assert cell_overlap((8, 8), last.cell).reshape(8, 8)[:, 0].tolist() == [1, 1, 1, 1, 0.5, 0, 0, 0]
    assert all(not location.note for location in locations[:-1])  # 4x4, 2x2: a location covers the centre
    stack = _ones_stack(3, 2, 1, 3)
    images = torch.randn(4, 1, 8, 8)
    table = get_probe("receptive-field").run(memory_target(stack, images, "prepared"), images,
                                             torch.zeros(4, dtype=torch.long), {}, 4).table
    for metric in ("erf_r50_px", "erf_outside_token", "erf_area_50", "uniform_r50_px"):
        assert "(0.5, 0.5)" in _last_row(table, metric)["note"], metric
    assert _last_row(table, "uniform_outside_token")["value"] == pytest.approx(1 - 4.5 ** 2 / 64)  # a 4.5 x 4.5 cell inside the image
    for metric in ("erf_outside_token", "erf_area_50"):  # a linear stack: every image has the same field
        row = _last_row(table, metric)
        assert row["ci_low"] == pytest.approx(row["value"]) == pytest.approx(row["ci_high"])


# --- how far the position table moved ---------------------------------------------------------------
def test_pe_moved_of_a_trained_run_and_of_an_untrained_model(trained_runs):
    """A trained run's pe_moved is ||P - P0|| / ||P0|| with P0 the untrained model of the same
    spec and seed, built independently by load_target; an untrained model has not moved; a
    model in memory without a run record has no P0."""
    import localitylab
    from localitylab.probes import load_target
    from localitylab.probes.api import memory_target

    run = trained_runs["vit-n/2"]
    model = localitylab.load(run.run_dir)
    table = get_probe("pe-similarity").run(memory_target(model, torch.zeros(1, 1, 8, 8, dtype=torch.uint8)),
                                           torch.zeros(1, 1, 8, 8, dtype=torch.uint8),
                                           torch.zeros(1, dtype=torch.long), {}, 1).table.set_index("metric")
    spec = model.run.spec
    start, _ = load_target("vit-n/2", device="cpu", data="digits", seed=model.run.config["seed"],
                           model_kw={"pos_embed_std": spec.model_kw["pos_embed_std"]})
    assert start.spec == spec
    first, last = start.model.pos_embed.detach()[0, 1:].double(), model.pos_embed.detach()[0, 1:].double()
    assert table.loc["pe_moved", "value"] == pytest.approx(float((last - first).norm() / first.norm()), rel=1e-9)
    assert table.loc["pe_moved", "value"] > 0 and pd_isna(table.loc["pe_moved", "ci_low"])
    untrained = get_probe("pe-similarity").run(start, torch.zeros(1, 1, 8, 8, dtype=torch.uint8),
                                               torch.zeros(1, dtype=torch.long), {}, 1).table.set_index("metric")
    assert untrained.loc["pe_moved", "value"] == 0.0 and "untrained" in untrained.loc["pe_moved", "note"]
    copy = memory_target(_pe_copy(start.model), torch.zeros(1, 1, 8, 8), "prepared")
    stranger = get_probe("pe-similarity").run(copy, torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long),
                                              {}, 1).table.set_index("metric")
    assert pd_isna(stranger.loc["pe_moved", "value"]) and stranger.loc["pe_moved", "note"]


def _pe_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)

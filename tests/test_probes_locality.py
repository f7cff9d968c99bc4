"""Probes II: pixel-permutation tests, effective receptive fields, data sets whose locality is known."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn as nn

from localitylab.data import load_dataset
from localitylab.data.generated import (
    NONLOCAL_CLASSES,
    SHAPE_NAMES,
    STRIPE_NAMES,
    generate_nonlocal,
    generate_shapes,
    generate_stripes,
    nonlocal_layout,
)
from localitylab.data.permutation import (
    global_permutation,
    identity_permutation,
    invert_permutation,
    local_window_permutation,
    patch_shuffle_permutation,
    permutation_for_setting,
    permute_pixels,
    swap_permutation,
)
from localitylab.probes import Measurements, ProbeInputs, get_probe, probe_names
from localitylab.probes.permutation import PermutationOptions, correct_per_image, equivariance_rows, logit_difference
from localitylab.probes.receptive_field import (
    centre_location,
    effective_receptive_fields,
    layer_feature_maps,
    mass_radius,
)
from localitylab.probes.sources import load_target, select_images
from localitylab.train import TrainConfig, train
from tests.cli_helpers import run_command

N_IMAGES = 64


def run_cli(*args):
    return run_command(*args)


@pytest.fixture(scope="module")
def probed(trained_runs):
    """{model name: (target, inputs)} for the three trained nano models, 64 test digits each."""
    result = {}
    for name, run in trained_runs.items():
        target, dataset = load_target(str(run.checkpoint), device="cpu")
        images, labels = select_images(dataset, N_IMAGES, seed=0)
        result[name] = (target, ProbeInputs(target, images, labels, PermutationOptions(), batch_size=32, seed=0))
    return result


def _rows_by_setting(rows, metric):
    return {row.setting: row for row in rows if row.metric == metric}


def certificate(inputs) -> list:
    out = Measurements()
    equivariance_rows(inputs, out)
    return out.rows


def accuracy(inputs, permutation) -> float:
    return float(correct_per_image(inputs, permutation).mean())


# --- permutations -------------------------------------------------------------------------------

def test_both_probes_are_registered():
    assert {"permutation", "receptive-field"} <= set(probe_names())


def test_pit_equivariance_certificate_is_float_rounding(probed):
    target, context = probed["pit-n"]
    rows = certificate(context)
    max_abs, rel = _rows_by_setting(rows, "equivariance_max_abs"), _rows_by_setting(rows, "equivariance_rel")
    assert max_abs["equivariance-pixel"].value < 1e-4
    assert rel["equivariance-pixel"].value < 1e-5
    # The same pi without moving the embedding rows breaks it: the test can fail.
    assert max_abs["input-only"].value > 1e-2


def test_vit_equivariance_holds_for_whole_patches_only(probed):
    target, context = probed["vit-n/2"]
    max_abs = _rows_by_setting(certificate(context), "equivariance_max_abs")
    assert max_abs["equivariance-patch"].value < 1e-4
    assert max_abs["equivariance-pixel"].value > 1e-2
    assert "does not hold" in max_abs["equivariance-pixel"].note


def test_certificates_from_the_clean_pass_logits_equal_a_direct_comparison(probed):
    """The permutation probe hands the certificates its clean pass's logits, and a ViT's pixel
    certificate and its input-only row are one comparison: each row equals `logit_difference`
    run on its own, with the reference model run afresh."""
    from localitylab.data.permutation import global_permutation, setting_seed

    target, context = probed["vit-n/2"]
    logits: dict = {}
    correct_per_image(context, None, logits)
    out = Measurements()
    equivariance_rows(context, out, logits)
    height, width = target.prepare(context.images[:1]).shape[-2:]
    pixel_pi = global_permutation(height, width, setting_seed(context.seed, "equivariance-pixel"))
    direct = logit_difference(target.model, target.model, context, pixel_pi)
    for setting in ("equivariance-pixel", "input-only"):
        assert _rows_by_setting(out.rows, "equivariance_max_abs")[setting].value == direct[0]
        assert _rows_by_setting(out.rows, "equivariance_rel")[setting].value == direct[1]
    assert [(r.metric, r.setting, r.value) for r in out.rows] == [(r.metric, r.setting, r.value)
                                                                  for r in certificate(context)]


def test_convnet_has_no_embedding_to_permute(probed):
    target, context = probed["resnet-n"]
    max_abs = _rows_by_setting(certificate(context), "equivariance_max_abs")
    assert set(max_abs) == {"input-only"}
    assert max_abs["input-only"].value > 1e-2 and "not a certificate" in max_abs["input-only"].note


def test_identity_and_zero_swaps_change_nothing(probed):
    target, context = probed["pit-n"]
    clean = accuracy(context, None)
    assert clean > 0.8
    assert accuracy(context, identity_permutation(8, 8)) == clean
    for distance in (2.0, math.inf):
        zero_swaps = swap_permutation(8, 8, 0, distance, seed=5)
        assert torch.equal(zero_swaps, torch.arange(64))
        assert accuracy(context, zero_swaps) == clean
    # And a real shuffle is applied before the model's preparation: a PiT with a learned
    # embedding loses most of its accuracy under a global shuffle.
    assert accuracy(context, global_permutation(8, 8, seed=1)) < clean - 0.3


@pytest.mark.parametrize("make", [
    lambda: global_permutation(8, 8, 3),
    lambda: local_window_permutation(10, 10, 4, 3),
    lambda: swap_permutation(8, 8, 50, 2.0, 3),
    lambda: swap_permutation(8, 8, 50, math.inf, 3),
    lambda: patch_shuffle_permutation(8, 8, 2, 3),
], ids=["global", "local", "swaps-local", "swaps-any", "patch-shuffle"])
def test_a_permutation_then_its_inverse_returns_the_image(make):
    permutation = make()
    assert torch.equal(permutation.sort().values, torch.arange(permutation.numel()))
    assert not torch.equal(permutation, torch.arange(permutation.numel()))
    side = int(math.isqrt(permutation.numel()))
    images = torch.randint(0, 256, (3, 2, side, side), dtype=torch.uint8)
    shuffled = permute_pixels(images, permutation)
    assert not torch.equal(shuffled, images)
    assert torch.equal(permute_pixels(shuffled, invert_permutation(permutation)), images)


@pytest.mark.parametrize("height, width, window", [(8, 8, 2), (8, 8, 4), (10, 10, 4), (6, 9, 4)])
def test_local_shuffle_keeps_every_pixel_in_its_window(height, width, window):
    permutation = local_window_permutation(height, width, window, seed=11).tolist()
    moved = 0
    for position, source in enumerate(permutation):
        row, col = divmod(position, width)
        source_row, source_col = divmod(source, width)
        assert (row // window, col // window) == (source_row // window, source_col // window)
        moved += source != position
    assert moved > height * width // 4  # it does shuffle


def test_a_single_swap_respects_the_distance():
    for seed in range(50):
        permutation = swap_permutation(9, 7, 1, 2.0, seed)
        changed = (permutation != torch.arange(63)).nonzero().flatten().tolist()
        assert len(changed) == 2
        (r1, c1), (r2, c2) = divmod(changed[0], 7), divmod(changed[1], 7)
        assert math.hypot(r1 - r2, c1 - c2) <= 2.0


def test_patch_shuffle_moves_whole_tiles():
    permutation = patch_shuffle_permutation(8, 8, 2, seed=4).view(8, 8)
    for tile_row in range(2):
        for tile_col in range(2):
            tile = permutation[tile_row * 4:tile_row * 4 + 4, tile_col * 4:tile_col * 4 + 4]
            rows, cols = tile // 8, tile % 8
            # A tile's pixels come from one source tile, in their original arrangement.
            assert torch.equal(rows - rows[0, 0], torch.arange(4).view(4, 1).expand(4, 4))
            assert torch.equal(cols - cols[0, 0], torch.arange(4).view(1, 4).expand(4, 4))
            assert rows[0, 0] % 4 == 0 and cols[0, 0] % 4 == 0


def test_every_row_is_reproducible_from_its_note(probed):
    target, context = probed["pit-n"]
    options = {"swap_fractions": [0.5], "swap_distances": [2, "inf"], "tile_grids": [2]}
    table = get_probe("permutation").run(target, context.images, context.labels, options, context.batch_size, seed=3).table
    accuracies = table[table["metric"] == "accuracy"].set_index("setting")
    assert {"clean", "global", "local-2", "local-4", "swaps-32-2", "swaps-32-inf", "patch-shuffle-2"} == set(accuracies.index)
    for setting in ("global", "local-4", "swaps-32-inf"):
        seeds = [int(s) for s in re.search(r"seeds=\[([\d, ]+)\]", accuracies.loc[setting, "note"]).group(1).split(",")]
        assert len(seeds) == 3  # the default number of draws; the row is their mean
        again = [accuracy(context, permutation_for_setting(setting, 8, 8, seed)) for seed in seeds]
        assert sum(again) / len(again) == pytest.approx(accuracies.loc[setting, "value"], abs=1e-12)
    drops = table[table["metric"] == "accuracy_drop"].set_index("setting")["value"]
    assert drops["global"] == pytest.approx(accuracies.loc["clean", "value"] - accuracies.loc["global", "value"])


# --- effective receptive field ----------------------------------------------------------------------

@pytest.mark.parametrize("depth", [1, 2, 3])
def test_conv_stack_erf_is_zero_outside_the_theoretical_window(depth):
    torch.manual_seed(depth)
    stack = nn.Sequential(*[nn.Conv2d(2 if i == 0 else 4, 4, 3, padding=1) for i in range(depth)]).eval()
    inputs = torch.randn(5, 2, 15, 15)
    maps, centres = effective_receptive_fields(layer_feature_maps(stack), inputs, batch_size=2)
    assert maps.shape == (depth, 15, 15)
    for layer in range(depth):
        reach = layer + 1  # n convolutions see (2n + 1) x (2n + 1)
        window = torch.zeros(15, 15, dtype=torch.bool)
        window[7 - reach:7 + reach + 1, 7 - reach:7 + reach + 1] = True
        assert torch.count_nonzero(maps[layer][~window]) == 0  # exactly zero, not small
        assert maps[layer][window].sum() == pytest.approx(1.0)
        assert centres[layer] == (7.5, 7.5)
        assert mass_radius(maps[layer], centres[layer], 0.9) <= reach * math.sqrt(2) + 1e-9


def test_batched_erf_matches_one_gradient_per_image(probed):
    target, context = probed["resnet-n"]
    inputs = target.prepare(context.images[:6])
    maps, _ = effective_receptive_fields(layer_feature_maps(target.model), inputs, batch_size=4)
    # Independent: one image at a time, the stage hooked directly.
    stage = target.model.layer2
    captured = {}
    handle = stage.register_forward_hook(lambda module, args, output: captured.update(out=output))
    total = torch.zeros(8, 8, dtype=torch.float64)
    try:
        for image in inputs:
            x = image[None].clone().requires_grad_(True)
            target.model(x)
            row, col, _ = centre_location(8, 8, captured["out"].shape[-2], captured["out"].shape[-1])
            captured["out"][0, :, row, col].sum().backward()
            total += x.grad[0].abs().sum(0).double()
    finally:
        handle.remove()
    assert torch.allclose(maps[1], total / total.sum(), atol=1e-6)


def test_pit_layer0_sees_beyond_the_neighbourhood_and_resnet_stage0_does_not(probed):
    target, context = probed["pit-n"]
    pit_maps, pit_centres = effective_receptive_fields(layer_feature_maps(target.model), target.prepare(context.images), 32)
    assert pit_centres[0] == (4.5, 4.5)
    outside = pit_maps[0].clone()
    outside[3:6, 3:6] = 0  # the centre pixel (4, 4) and its 8 neighbours
    assert outside.sum() > 0.05 and torch.count_nonzero(outside) > 40
    # resnet-n's first stage is three 3x3 convolutions (stem + basic block): a 7x7 window,
    # so row 0 and column 0 of an 8x8 image get exactly nothing.
    target, context = probed["resnet-n"]
    res_maps, _ = effective_receptive_fields(layer_feature_maps(target.model), target.prepare(context.images), 32)
    assert torch.count_nonzero(res_maps[0][0, :]) == 0 and torch.count_nonzero(res_maps[0][:, 0]) == 0
    assert torch.count_nonzero(res_maps[0][1:, 1:]) == 49


@pytest.mark.parametrize("size, centre", [(5, (2.5, 2.5)), (6, (3.0, 3.0)), (7, (3.5, 2.5))])
def test_uniform_radius_matches_a_count_by_hand(size, centre):
    distances = sorted(math.hypot(r + 0.5 - centre[0], c + 0.5 - centre[1]) for r in range(size) for c in range(size))
    for fraction in (0.5, 0.9):
        needed = math.ceil(fraction * size * size - 1e-9)
        expected = distances[needed - 1]
        assert mass_radius(torch.ones(size, size), centre, fraction) == pytest.approx(expected)
    if size == 5:  # 1 + 4 + 4 + 4 = 13 pixels within radius 2 hold 52% of 25
        assert mass_radius(torch.ones(5, 5), centre, 0.5) == pytest.approx(2.0)


def test_receptive_field_table_and_figures(probed, tmp_path):
    target, context = probed["resnet-n"]
    # Few images and IG steps: this checks the table's shape, not the numbers' precision.
    probe = get_probe("receptive-field")
    result = probe.run(target, context.images[:16], context.labels[:16], {"ig_steps": 4}, batch_size=8)
    table = result.table
    erf = table[table["metric"] == "erf_r50_px"].set_index("layer")["value"]
    assert list(erf.index) == [0, 1, 2, 3] and erf.notna().all()
    r90 = table[table["metric"] == "erf_r90_px"].set_index("layer")["value"]
    assert (erf <= r90).all()
    frac = table[table["metric"] == "erf_r50_frac"].set_index("layer")["value"]
    assert (frac * 8 - erf).abs().max() < 1e-12
    attribution = table[table["metric"] == "attribution_r50_px"].set_index("setting")["value"]
    assert set(attribution.index) == {"saliency", "integrated-gradients"} and attribution.notna().all()
    figures = probe.plot([table], tmp_path) + probe.figures(target, result.drawing, tmp_path)
    assert {p.name for p in figures} == {"receptive-field.png", "receptive-field-maps.png"}
    assert all(p.stat().st_size > 1000 for p in figures)


# --- generated data sets -------------------------------------------------------------------------------

@pytest.mark.parametrize("generate", [generate_shapes, generate_stripes, generate_nonlocal],
                         ids=["shapes", "stripes", "nonlocal"])
def test_generators_are_seeded(generate):
    images, labels = generate(16, 40, seed=1)
    again_images, again_labels = generate(16, 40, seed=1)
    other_images, _ = generate(16, 40, seed=2)
    assert images.dtype == torch.uint8 and images.shape == (40, 3, 16, 16)
    assert torch.equal(images, again_images) and torch.equal(labels, again_labels)
    assert not torch.equal(images, other_images)


@pytest.mark.parametrize("name, classes", [("shapes-16", SHAPE_NAMES), ("nonlocal-16", NONLOCAL_CLASSES),
                                           ("shapes-11", SHAPE_NAMES), ("nonlocal-24", NONLOCAL_CLASSES),
                                           ("stripes-8", STRIPE_NAMES)])
def test_generated_data_sets_load_identically(name, classes):
    first, second = load_dataset(name), load_dataset(name)
    size = int(name.split("-")[1])
    assert first.info.class_names == list(classes) and first.info.img_size == size
    assert first.train_images.shape[1:] == (3, size, size) and len(first.test_images) > 0
    assert torch.equal(first.train_images, second.train_images) and torch.equal(first.test_labels, second.test_labels)
    assert set(first.train_labels.unique().tolist()) == set(range(len(classes)))


def test_nonlocal_label_is_the_relation_of_the_two_fixed_patches():
    images, labels = generate_nonlocal(16, 300, seed=7)
    side, (ay, ax), (by, bx) = nonlocal_layout(16)
    patch_a = images[:, :, ay:ay + side, ax:ax + side].flatten(1)
    patch_b = images[:, :, by:by + side, bx:bx + side].flatten(1)
    assert torch.equal((patch_a == patch_b).all(1).long(), labels)
    assert (ay, ax) == (1, 1) and by + side == 15  # opposite corners, far apart


def test_stripes_label_is_the_direction_along_which_neighbours_agree():
    # By hand: a grating is constant along its stripes, so the neighbour difference is smallest
    # in the stripes' direction (0 deg: along a row; 45: up-right; 90: down a column; 135: down-right).
    images, labels = generate_stripes(16, 400, seed=3)
    x = images.float().mean(1)
    steps = [x[:, :, 1:] - x[:, :, :-1], x[:, 1:, :-1] - x[:, :-1, 1:], x[:, 1:, :] - x[:, :-1, :],
             x[:, 1:, 1:] - x[:, :-1, :-1]]
    found = torch.stack([step.pow(2).mean((1, 2)) for step in steps], 1).argmin(1)
    assert (found == labels).float().mean() > 0.97
    assert torch.bincount(labels, minlength=4).min() > 70  # balanced over the four orientations


def test_shapes_are_learnable_by_a_convnet(tmp_path):
    result = train(TrainConfig("resnet-n", "shapes-16", out=tmp_path / "run", epochs=3, batch_size=32, lr=2e-3,
                               warmup_epochs=0.5, device="cpu"))
    assert result.final["test_acc"] > 0.5  # chance is 0.2 (about 0.7 after 3 epochs)


# --- command line ---------------------------------------------------------------------------------------

def test_cli_permutation_probe_writes_table_meta_and_figure(trained_runs, tmp_path):
    out = tmp_path / "probes"
    result = run_cli("probe", "permutation", str(trained_runs["pit-n"].checkpoint), "--images", "64", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert {"permutation.csv", "meta.json", "permutation.png"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "meta.json").read_text())["probes"]["permutation"]["n_images"] == 64


def test_cli_trains_on_a_generated_data_set(tmp_path):
    result = run_cli("train", "resnet-n", "shapes-16", "--epochs", "1", "--out", str(tmp_path / "run"), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout


def test_cli_bad_probe_option_is_one_line_and_status_2(trained_runs, tmp_path):
    out = tmp_path / "probes"
    result = run_cli("probe", "permutation", str(trained_runs["pit-n"].checkpoint), "--opt", "bogus=1",
                     "--out", str(out))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("localitylab: error:") and "bogus" in lines[0]
    assert "--window-sizes" in lines[0]  # names what is valid, as the flags a user types
    assert not out.exists()


def test_ring_radii_equal_pixel_radii():
    """The bootstrap's radii over rings of equal distance (`distance_rings`, `ring_radii`) equal
    `mass_radii` over pixels: on random maps, sparse maps, a uniform map (whose mass crosses
    0.5 exactly), an all-zero map, and at centres on and off the pixel grid."""
    import numpy as np

    from localitylab.probes.erf_geometry import distance_rings, mass_radii, ring_radii

    rng = np.random.default_rng(0)
    shape = (14, 10)
    maps = rng.random((5, 140)) ** 4
    maps[1, rng.random(140) < 0.9] = 0.0
    maps = np.vstack([maps, np.ones((1, 140)), np.zeros((1, 140))])
    for centre in ((7.0, 5.0), (7.5, 5.5), (3.2, 8.9)):
        order, starts, distance = distance_rings(shape, centre)
        rings = np.add.reduceat(maps[:, order], starts, axis=1)
        assert len(distance) < 140 and np.all(np.diff(distance) > 0)
        for fraction in (0.5, 0.9):
            np.testing.assert_array_equal(ring_radii(rings, distance, fraction), mass_radii(maps, shape, centre, fraction))

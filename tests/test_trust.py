"""Numbers a researcher can trust: known answers for the feature anchors and the ERF, the
intervals' coverage, the certificate's refusals, and a report that ranks only what its
intervals separate."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from localitylab.models.anchors import conv_arithmetic
from localitylab.probes import Measurements, ProbeInputs, get_probe, load_target
from localitylab.probes.permutation import PermutationOptions, equivariance_rows, position_outside_table
from localitylab.probes.receptive_field import effective_receptive_fields, layer_feature_maps, mass_radius


# --- the pixel anchor of a feature location ----------------------------------------------------
def ones_stack(kernel: int, stride: int, padding: int, depth: int) -> nn.Sequential:
    """`depth` purely linear all-ones convolutions: their field is known in closed form."""
    convs = [nn.Conv2d(1, 1, kernel, stride=stride, padding=padding, bias=False) for _ in range(depth)]
    for conv in convs:
        nn.init.ones_(conv.weight)
    return nn.Sequential(*convs).eval()


def exact_field(kernel: int, stride: int, padding: int, depth: int, size: int, location: tuple[int, int]) -> torch.Tensor:
    """The field of one output location, built forwards from the convolution arithmetic and
    not by differentiation: a delta at the location pushed back through each convolution
    with conv_transpose2d (each input pixel counts its paths to the location)."""
    sizes = [size]
    for _ in range(depth):
        sizes.append((sizes[-1] + 2 * padding - kernel) // stride + 1)
    field = torch.zeros(1, 1, sizes[-1], sizes[-1], dtype=torch.float64)
    field[0, 0, location[0], location[1]] = 1.0
    ones = torch.ones(1, 1, kernel, kernel, dtype=torch.float64)
    for level in range(depth, 0, -1):
        wanted = sizes[level - 1]
        produced = (sizes[level] - 1) * stride - 2 * padding + kernel
        field = F.conv_transpose2d(field, ones, stride=stride, padding=padding, output_padding=wanted - produced)
    return field[0, 0]


def brute_radius(field: torch.Tensor, centre: tuple[float, float], fraction: float) -> float:
    """Smallest radius around `centre` holding `fraction` of the mass, by sorting every pixel."""
    pixels = sorted((math.hypot(r + 0.5 - centre[0], c + 0.5 - centre[1]), float(field[r, c]))
                    for r in range(field.shape[0]) for c in range(field.shape[1]))
    total, running = sum(w for _, w in pixels), 0.0
    for distance, weight in pixels:
        running += weight
        if running >= fraction * total - 1e-9:
            return distance
    return pixels[-1][0]


def centroid(field: torch.Tensor) -> tuple[float, float]:
    coords = torch.arange(field.shape[0], dtype=torch.float64) + 0.5
    weights = field / field.sum()
    return float((weights.sum(1) * coords).sum()), float((weights.sum(0) * coords).sum())


@pytest.mark.parametrize("kernel, stride, padding, depth", [(3, 2, 1, 3), (3, 1, 1, 2), (2, 2, 0, 3), (5, 2, 2, 2)])
def test_erf_of_strided_ones_convolutions_has_the_exact_centre_and_radii(kernel, stride, padding, depth):
    size = 32
    maps, centres = effective_receptive_fields(layer_feature_maps(ones_stack(kernel, stride, padding, depth)),
                                               torch.randn(3, 1, size, size), batch_size=2)
    grid = size
    for _ in range(depth):
        grid = (grid + 2 * padding - kernel) // stride + 1
    # Independently of the probe: the diagonal location whose exact field is centred nearest
    # the image's centre pixel (15.5 + 1 = 16.5), its field, and that field's centroid.
    fields = [exact_field(kernel, stride, padding, depth, size, (i, i)) for i in range(grid)]
    field = min(fields, key=lambda f: abs(centroid(f)[0] - (size // 2 + 0.5)))
    assert torch.allclose(maps[-1].double(), field / field.sum(), atol=1e-6)
    assert centres[-1] == pytest.approx(centroid(field))
    for fraction in (0.5, 0.9):
        assert mass_radius(maps[-1], centres[-1], fraction) == pytest.approx(brute_radius(field, centres[-1], fraction))
    # erf_outside_token: the exact field's mass outside the location's stride cell (stride^depth
    # pixels wide, centred on its anchor), each pixel counted by the area it has inside.
    from localitylab.probes.erf_geometry import outside_cell
    from localitylab.probes.receptive_field import effective_receptive_field_locations

    half = stride ** depth / 2
    cy, cx = centroid(field)
    _, locations = effective_receptive_field_locations(layer_feature_maps(ones_stack(kernel, stride, padding, depth)),
                                                       torch.randn(1, 1, size, size), 1)
    assert locations[-1].cell == pytest.approx((cy - half, cx - half, cy + half, cx + half))
    inside = sum(float(field[r, c]) * max(0.0, min(r + 1, cy + half) - max(r, cy - half))
                 * max(0.0, min(c + 1, cx + half) - max(c, cx - half)) for r in range(size) for c in range(size))
    outside = outside_cell(maps[-1].reshape(1, -1).double().numpy(), (size, size),
                           (cy - half, cx - half, cy + half, cx + half))[0]
    assert outside == pytest.approx(1 - inside / float(field.sum()))


def test_three_stride_two_convolutions_at_32_pixels():
    """The case of the audit: the probe used to measure around (20, 20) and find r50 6.52."""
    maps, centres = effective_receptive_fields(layer_feature_maps(ones_stack(3, 2, 1, 3)), torch.randn(2, 1, 32, 32), 2)
    assert centres[-1] == (16.5, 16.5)
    assert mass_radius(maps[-1], centres[-1], 0.5) == pytest.approx(5.0)


def test_anchors_of_a_resnet_and_a_patch_embedding():
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    with torch.no_grad(), conv_arithmetic(resnet, (64, 64)) as arithmetic:
        resnet(torch.zeros(1, 3, 64, 64))
    # 7x7 s2 p3 stem, 3x3 s2 p1 max-pool, then 3x3 s2 p1 convolutions: i * stride + 0.5
    for grid, stride in ((32, 2), (16, 4), (8, 8), (4, 16), (2, 32)):
        anchor = arithmetic.anchor(grid, grid)
        assert anchor.step == (stride, stride) and anchor.start == (0.5, 0.5)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=1).eval()
    with torch.no_grad(), conv_arithmetic(vit, (32, 32)) as arithmetic:
        vit(torch.zeros(1, 3, 32, 32))
    assert arithmetic.anchor(8, 8).centre(1, 2) == ((1 + 0.5) * 4, (2 + 0.5) * 4)  # a patch's centre


def test_untrained_resnet18_stays_local_around_the_true_centre():
    """The audit: around the evenly stretched anchors r50 grew 1.00 -> 5.15 px over the stages."""
    target, dataset = load_target("resnet-18", device="cpu", data="shapes-32", seed=0)
    images = dataset.test_images[:8]
    table = get_probe("receptive-field").run(target, images, dataset.test_labels[:8], {"ig_steps": 1}, 8).table
    r50 = table[table["metric"] == "erf_r50_px"].set_index("layer")["value"]
    assert r50.max() <= 2.0, r50.to_dict()


# --- intervals --------------------------------------------------------------------------------
def test_intervals_cover_the_known_mean_and_narrow_as_one_over_root_n():
    covered = 0
    for repetition in range(200):
        out = Measurements()
        out.per_image("x", np.random.default_rng(repetition).exponential(2.0, size=40))  # skewed, mean 2
        out.add_intervals(repetition)
        low, high = out.rows[0].interval
        covered += low <= 2.0 <= high
    assert 0.90 <= covered / 200 <= 0.99
    widths = {}
    for n in (50, 800):
        values = []
        for repetition in range(10):
            out = Measurements()
            out.per_image("x", np.random.default_rng(100 + repetition).normal(size=n))
            out.add_intervals(repetition)
            values.append(out.rows[0].interval[1] - out.rows[0].interval[0])
        widths[n] = np.mean(values)
    assert widths[50] / widths[800] == pytest.approx(4.0, rel=0.2)  # sqrt(800 / 50)


def test_intervals_are_seeded_and_drawn_settings_are_wider():
    rng = np.random.default_rng(0)
    correct = (rng.random((3, 200)) < np.array([[0.3], [0.5], [0.7]])).astype(float)  # three draws differ
    first, second = Measurements(), Measurements()
    for out in (first, second):
        out.per_image("draws", correct)
        out.per_image("pooled", correct.mean(axis=0))
        out.add_intervals(7)
    assert first.rows[0].interval == second.rows[0].interval
    drawn, pooled = (row.interval[1] - row.interval[0] for row in first.rows)
    assert drawn > 2 * pooled  # the draws' differences widen the interval; images alone do not see them


# --- the certificate -------------------------------------------------------------------------------
def in_memory_target(model: nn.Module, size: int):
    """A ProbeTarget around a timm model built here, and two random images for it."""
    from localitylab.data.registry import DataInfo
    from localitylab.models.describe import describe_model
    from localitylab.models.registry import ModelSpec
    from localitylab.probes.target import ProbeTarget

    data = DataInfo("random", size, 3, [str(i) for i in range(10)], [0.5] * 3, [0.25] * 3)
    target = ProbeTarget(model.eval(), ModelSpec("timm:x", size, 3, 10), data, describe_model(model), "x", "x",
                         torch.device("cpu"))
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return target, images


@pytest.mark.parametrize("name, kw, reason", [
    ("eva02_tiny_patch14_224", dict(img_size=28, depth=1), "rotary"),
    ("swin_tiny_patch4_window7_224", dict(img_size=224, depths=(1, 1, 1, 1), embed_dim=24, num_heads=(1, 1, 1, 1)),
     "window"),
])
def test_certificate_refuses_models_with_position_outside_the_table(name, kw, reason):
    model = timm.create_model(name, pretrained=False, num_classes=10, **kw)
    assert reason in position_outside_table(model)
    target, images = in_memory_target(model, kw["img_size"])
    out = Measurements()
    equivariance_rows(ProbeInputs(target, images, torch.zeros(2, dtype=torch.long), PermutationOptions()), out)
    refused = [row for row in out.rows if row.setting == "equivariance"]
    assert refused and all(row.value is None and reason in row.note and "no certificate" in row.note
                           for row in refused)
    assert not any(row.setting in ("equivariance-pixel", "equivariance-patch") for row in out.rows)


def test_a_plain_vit_gets_its_certificate():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=1, depth=1)
    assert position_outside_table(model) is None


# --- the report says only what the data shows ------------------------------------------------------
def test_two_copies_of_one_checkpoint_are_indistinguishable(trained_runs, tmp_path):
    from localitylab.probes import ProbeRequest, run_probes
    from localitylab.report.collect import collect_runs
    from localitylab.report.reading import reading
    from localitylab.report.summary import group_by_seed, summary_row

    source = trained_runs["vit-n/2"].run_dir
    folders = []
    for copy in ("copy-a", "copy-b"):
        folder = tmp_path / copy
        shutil.copytree(source, folder, ignore=shutil.ignore_patterns("probes"))
        run_probes(["attention-distance", "permutation"],
                   ProbeRequest(source=str(folder), n_images=48, device="cpu", options={"draws": 2}))
        folders.append(folder)
    records = collect_runs(folders)
    groups = group_by_seed(records)
    assert len(groups) == 2  # the same seed twice: copies, not seed replicates
    rows = {group.name: summary_row(group, records) for group in groups}
    sentences = reading(rows)
    # Raw drops are never ranked (a drop is capped by clean accuracy minus chance): with the
    # order-dependence rows there, the reading ranks on them and says nothing of the raw drop.
    assert not any(s.startswith("acc drop") or "largest drop" in s for s in sentences)
    for key in ("locality ratio", "order dependence, global shuffle"):
        sentence = next(s for s in sentences if key in s)
        assert "indistinguishable" in sentence, sentence

"""Properties that hold for any input, checked with hypothesis.

- Pixel permutations round-trip: permute then invert is the identity, for any size and
  seed; every shuffle the permutation probe uses is a permutation with its own locality
  (local-k keeps pixels in their window, patch-shuffle moves whole tiles, T swaps move at
  most 2T pixels, each by at most d when T = 1).
- attention-distance's numbers lie in their ranges for any attention (docs/probes.md): distance
  between 0 and the grid's diameter, shares and normalised entropies in [0, 1], the ratio
  to uniform in [0, diameter / uniform]; uniform attention gives exactly the uniform
  distance, which the code computes a second, independent way (by offsets).
- A probe's result does not depend on the batch size (or the query block).
- Names that become folders stay one folder: no separator, never '.' or '..'.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from localitylab.attention import TokenGeometry
from localitylab.data.permutation import (global_permutation, invert_permutation, local_window_permutation,
                                          mean_displacement, patch_shuffle_permutation, permutation_for_setting,
                                          permute_pixels, random_permutation, swap_pairs,
                                          swap_permutation)
from localitylab.attention import CallGeometry, softmax_pieces
from localitylab.probes.attention_distance import attention_row_values, block_row_values
from localitylab.probes.permutation import shuffle_settings
from localitylab.probes.registry import get_probe

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MODEL = settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])

sides = st.integers(min_value=1, max_value=12)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def assert_is_permutation(permutation: torch.Tensor, n: int) -> None:
    assert permutation.shape == (n,) and permutation.dtype == torch.long
    assert torch.equal(torch.sort(permutation).values, torch.arange(n))


# --- permutations ------------------------------------------------------------------------------

@FAST
@given(height=sides, width=sides, channels=st.integers(1, 3), seed=seeds)
def test_permute_then_inverse_is_the_identity(height, width, channels, seed):
    permutation = random_permutation(height * width, seed)
    assert_is_permutation(permutation, height * width)
    assert torch.equal(permutation, random_permutation(height * width, seed))  # a seed is one permutation
    inverse = invert_permutation(permutation)
    assert torch.equal(permutation[inverse], torch.arange(height * width))
    assert torch.equal(inverse[permutation], torch.arange(height * width))
    images = torch.randint(0, 256, (2, channels, height, width), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(seed))
    shuffled = permute_pixels(images, permutation)
    assert torch.equal(permute_pixels(shuffled, inverse), images)
    # The same shuffle for every channel and image: the multiset of pixel vectors is unchanged.
    assert torch.equal(shuffled.flatten(2).sort(dim=-1).values, images.flatten(2).sort(dim=-1).values)


@FAST
@given(height=sides, width=sides, seed=seeds, other=seeds)
def test_permutations_compose_as_index_arrays(height, width, seed, other):
    p, q = random_permutation(height * width, seed), random_permutation(height * width, other)
    images = torch.arange(3 * height * width, dtype=torch.float32).reshape(1, 3, height, width)
    assert torch.equal(permute_pixels(permute_pixels(images, p), q), permute_pixels(images, p[q]))


@FAST
@given(height=st.integers(2, 12), width=st.integers(2, 12), window=st.integers(2, 6), seed=seeds)
def test_local_window_shuffle_is_a_permutation_inside_each_window(height, width, window, seed):
    permutation = local_window_permutation(height, width, window, seed)
    assert_is_permutation(permutation, height * width)
    position = torch.arange(height * width)
    assert torch.equal((permutation // width) // window, (position // width) // window)
    assert torch.equal((permutation % width) // window, (position % width) // window)


@FAST
@given(tiles=st.integers(2, 4), tile_h=st.integers(1, 3), tile_w=st.integers(1, 3), seed=seeds)
def test_patch_shuffle_moves_whole_tiles(tiles, tile_h, tile_w, seed):
    height, width = tiles * tile_h, tiles * tile_w
    permutation = patch_shuffle_permutation(height, width, tiles, seed)
    assert_is_permutation(permutation, height * width)
    position = torch.arange(height * width)
    # Each pixel keeps its place inside its tile, and the tile order is never the identity.
    assert torch.equal((permutation // width) % tile_h, (position // width) % tile_h)
    assert torch.equal((permutation % width) % tile_w, (position % width) % tile_w)
    assert not torch.equal(permutation, position)


@FAST
@given(height=sides, width=sides, swaps=st.integers(0, 40),
       distance=st.one_of(st.just(math.inf), st.floats(1.0, 6.0)), seed=seeds)
def test_swaps_are_permutations_that_move_few_pixels_a_short_way(height, width, swaps, distance, seed):
    permutation = swap_permutation(height, width, swaps, distance, seed)
    assert_is_permutation(permutation, height * width)
    moved = permutation != torch.arange(height * width)
    assert int(moved.sum()) <= 2 * swaps
    single = swap_permutation(height, width, 1, distance, seed)
    position = torch.arange(height * width)
    changed = position[single != position]
    if len(changed):  # one swap: two pixels, at most `distance` apart
        assert len(changed) == 2
        (a, b) = changed.tolist()
        assert math.hypot(a // width - b // width, a % width - b % width) <= distance + 1e-9


@FAST
@given(height=sides, width=sides, swaps=st.integers(0, 60),
       distance=st.one_of(st.just(math.inf), st.floats(1.0, 4.0)), seed=seeds)
def test_swap_permutation_is_exactly_its_t_swaps_and_moves_no_pixel_beyond_t_times_d(height, width, swaps, distance,
                                                                                     seed):
    """The permutation `--permute-pixels SEED --swaps T --swap-distance d` trains on: T pairs of
    distinct pixels within d, composed in order (rebuilt here as a product of transpositions),
    so its parity is T's and no pixel ends farther than min(T*d, the diagonal) from home."""
    permutation = swap_permutation(height, width, swaps, distance, seed)
    pairs = swap_pairs(height, width, swaps, distance, seed)
    n = height * width
    assert len(pairs) == (swaps if n > 1 else 0)
    composed = torch.arange(n)
    for a, b in pairs.tolist():
        assert a != b and math.hypot(a // width - b // width, a % width - b % width) <= distance + 1e-9
        transposition = torch.arange(n)
        transposition[a], transposition[b] = b, a
        composed = composed[transposition]  # out[p] = previous[t[p]]: the contents of a and b exchanged
    assert torch.equal(composed, permutation)
    # parity from the cycles: n - (number of cycles) transpositions make it, and T has the same parity
    seen, cycles = set(), 0
    for start in range(n):
        if start not in seen:
            cycles += 1
            position = start
            while position not in seen:
                seen.add(position)
                position = int(permutation[position])
    assert (n - cycles) % 2 == len(pairs) % 2 and n - cycles <= len(pairs)
    position = torch.arange(n)
    moved = torch.hypot((position // width - permutation // width).double(),
                        (position % width - permutation % width).double())
    assert float(moved.max()) <= min(swaps * distance if swaps else 0.0, math.hypot(height - 1, width - 1)) + 1e-9


@FAST
@given(height=st.integers(2, 10), width=st.integers(2, 10), seed=seeds)
def test_every_probe_setting_is_a_reproducible_permutation(height, width, seed):
    diameter = math.hypot(height - 1, width - 1)
    for setting in ["clean", *shuffle_settings(height, width, {})]:
        permutation = permutation_for_setting(setting, height, width, seed)
        assert_is_permutation(permutation, height * width)
        assert torch.equal(permutation, permutation_for_setting(setting, height, width, seed)), setting
        displacement = mean_displacement(permutation, height, width)
        assert 0 <= displacement <= diameter + 1e-9
        assert (displacement == 0) == (setting == "clean" or torch.equal(permutation, torch.arange(height * width)))
    assert_is_permutation(global_permutation(height, width, seed), height * width)


# --- attention-distance ranges ------------------------------------------------------------------

@st.composite
def attention_blocks(draw):
    """(geometry, probs, query rows) with random softmax attention over prefix + grid keys."""
    geometry = TokenGeometry((draw(st.integers(1, 5)), draw(st.integers(1, 5))), draw(st.sampled_from([1, 2, 4])),
                             draw(st.integers(0, 2)))
    batch, heads = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    rows = draw(st.lists(st.integers(0, geometry.num_grid_tokens - 1), min_size=1, max_size=6))
    sharpness = draw(st.floats(0.0, 30.0))  # 0: uniform; large: nearly one-hot
    generator = torch.Generator().manual_seed(draw(seeds))
    logits = torch.randn(batch, heads, len(rows), geometry.num_tokens, generator=generator, dtype=torch.float64)
    return geometry, (logits * sharpness).softmax(dim=-1), torch.tensor(rows)


def block_means(geometry: TokenGeometry, probs: torch.Tensor, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per head: the definition's values, averaged over images and query rows."""
    centres = geometry.centres(dtype=torch.float64)
    values = attention_row_values(probs, centres[rows], centres, geometry.num_prefix_tokens)
    return {key: values[key].mean(dim=(0, 2)) for key in ("distance", "prefix", "entropy")}


@FAST
@given(attention_blocks())
def test_attention_distance_metrics_lie_in_their_ranges(block):
    geometry, probs, rows = block
    means = block_means(geometry, probs, rows)
    grid_h, grid_w = geometry.grid
    diameter = math.hypot(grid_h - 1, grid_w - 1) * geometry.patch_size
    uniform = geometry.uniform_distance_px()
    assert 0 <= uniform <= diameter + 1e-9
    assert bool(((means["distance"] >= -1e-9) & (means["distance"] <= diameter + 1e-9)).all())
    assert bool(((means["prefix"] >= -1e-12) & (means["prefix"] <= 1 + 1e-12)).all())
    if geometry.num_prefix_tokens == 0:
        assert bool((means["prefix"] == 0).all())
    if geometry.num_grid_tokens > 1:
        assert bool(((means["entropy"] >= -1e-9) & (means["entropy"] <= 1 + 1e-9)).all())
        ratio = means["distance"] / uniform
        assert bool(((ratio >= 0) & (ratio <= diameter / uniform + 1e-9)).all())
        # The side fraction of docs/probes.md: mean_distance_frac = px / max(H, W) is at most sqrt(2).
        assert bool((means["distance"] / geometry.image_side <= math.sqrt(2) + 1e-9).all())


@FAST
@given(attention_blocks(), st.floats(0.0, 0.5), seeds)
def test_values_from_logits_equal_the_values_from_the_softmax(block, masked_fraction, seed):
    """The probe reduces the reader's softmax pieces (no softmax, no log per key); the
    definition reduces the softmax. Masked keys (-inf logits) included, as long as each row
    keeps a grid key."""
    geometry, probs, rows = block
    logits = probs.log()
    generator = torch.Generator().manual_seed(seed)
    masked = torch.rand(logits.shape, generator=generator, dtype=torch.float64) < masked_fraction
    masked[..., geometry.num_prefix_tokens] = False  # one grid key always allowed
    logits = logits.masked_fill(masked, float("-inf"))
    centres = geometry.centres(dtype=torch.float64)
    prefix = torch.full((geometry.num_prefix_tokens, 2), float("nan"), dtype=torch.float64)
    where = CallGeometry(torch.arange(geometry.num_tokens), torch.cat([prefix, centres]), centres,
                         geometry.num_prefix_tokens, torch.arange(len(logits)))
    from_logits = block_row_values(softmax_pieces(0, logits, where, rows + geometry.num_prefix_tokens)[0])
    reference = attention_row_values(logits.softmax(dim=-1), centres[rows], centres, geometry.num_prefix_tokens)
    for key in ("distance", "prefix", "entropy"):
        assert from_logits[key].shape == reference[key].shape == probs.shape[:3]
        assert torch.allclose(from_logits[key], reference[key], rtol=1e-9, atol=1e-9, equal_nan=True), key


@FAST
@given(rows=st.integers(1, 6), cols=st.integers(1, 6), patch=st.sampled_from([1, 2, 3]), prefix=st.integers(0, 2),
       prefix_mass=st.floats(0.0, 0.9))
def test_uniform_attention_gives_the_uniform_distance_two_ways(rows, cols, patch, prefix, prefix_mass):
    geometry = TokenGeometry((rows, cols), patch, prefix)
    n = geometry.num_grid_tokens
    assume(prefix > 0 or prefix_mass == 0)
    # Every grid query attends uniformly over the grid (whatever goes to the prefix tokens:
    # the distance is renormalised over the grid keys).
    probs = torch.full((1, 1, n, geometry.num_tokens), (1 - prefix_mass) / n, dtype=torch.float64)
    if prefix:
        probs[..., :prefix] = prefix_mass / prefix
    means = block_means(geometry, probs, torch.arange(n))
    assert float(means["distance"][0]) == pytest.approx(geometry.uniform_distance_px(), rel=1e-9, abs=1e-12)
    assert float(means["prefix"][0]) == pytest.approx(prefix_mass, abs=1e-12)
    if n > 1:
        assert float(means["entropy"][0]) == pytest.approx(1.0, rel=1e-9)


@FAST
@given(rows=st.integers(1, 6), cols=st.integers(1, 6), patch=st.sampled_from([1, 2]))
def test_attention_to_itself_is_distance_zero_and_entropy_zero(rows, cols, patch):
    geometry = TokenGeometry((rows, cols), patch, 1)
    n = geometry.num_grid_tokens
    probs = torch.zeros(1, 2, n, geometry.num_tokens, dtype=torch.float64)
    probs[0, :, torch.arange(n), torch.arange(n) + 1] = 1.0
    means = block_means(geometry, probs, torch.arange(n))
    assert torch.equal(means["distance"], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(means["prefix"], torch.zeros(2, dtype=torch.float64))
    if n > 1:
        assert torch.allclose(means["entropy"], torch.zeros(2, dtype=torch.float64))


# --- batch-size independence --------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def tiny_target(source: str):
    """An untrained registry model on digits, and 6 test images (built once per session)."""
    from localitylab.probes.sources import load_target, select_images

    target, dataset = load_target(source, device="cpu", seed=0)
    images, labels = select_images(dataset, 6, seed=0)
    return target, images, labels


@MODEL
@given(batch_size=st.integers(1, 6), query_block=st.one_of(st.none(), st.integers(1, 20)))
def test_attention_distance_does_not_depend_on_batch_size_or_query_block(batch_size, query_block):
    target, images, labels = tiny_target("vit-n/2")
    probe = get_probe("attention-distance")
    reference = probe.run(target, images, labels, batch_size=6).table.set_index(["metric", "layer", "head"])["value"]
    table = probe.run(target, images, labels, {"query_block": query_block}, batch_size).table
    values = table.set_index(["metric", "layer", "head"])["value"]
    assert set(values.index) == set(reference.index)
    for key, value in values.items():
        assert value == pytest.approx(reference[key], rel=1e-5, abs=1e-6), key


PERMUTATION_OPTIONS = {"window_sizes": [2], "tile_grids": [2], "swap_fractions": [0.5], "swap_distances": ["inf"]}


@functools.lru_cache(maxsize=None)
def permutation_table(batch_size: int):
    target, images, labels = tiny_target("pit-n")
    return get_probe("permutation").run(target, images, labels, PERMUTATION_OPTIONS, batch_size).table


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch_size=st.integers(1, 5))
def test_permutation_probe_does_not_depend_on_batch_size(batch_size):
    whole, split = permutation_table(6), permutation_table(batch_size)
    assert list(whole["metric"]) == list(split["metric"]) and list(whole["setting"]) == list(split["setting"])
    exact = whole["metric"].isin(["accuracy", "accuracy_drop", "mean_displacement_px"])
    assert list(whole.loc[exact, "value"]) == list(split.loc[exact, "value"])  # counts: exactly equal
    # The certificate sums squares over batches: equal up to float rounding. Order dependence
    # is empty (NaN) in both where clean accuracy's interval includes chance.
    assert whole.loc[~exact, "value"].tolist() == pytest.approx(split.loc[~exact, "value"].tolist(),
                                                                rel=1e-4, abs=1e-5, nan_ok=True)


# --- names that become folders ------------------------------------------------------------------

@FAST
@given(st.text(max_size=40))
def test_safe_name_is_always_one_folder(name):
    from localitylab.io import safe_name

    cleaned = safe_name(name)
    assert cleaned and cleaned not in (".", "..")
    assert "/" not in cleaned and "\\" not in cleaned and "\0" not in cleaned
    assert (Path("base") / cleaned).parent == Path("base")
    assert safe_name(cleaned) == cleaned  # already safe names are kept as they are


@FAST
@given(model=st.text(min_size=1, max_size=20), dataset=st.text(min_size=1, max_size=20),
       permute=st.one_of(st.none(), st.integers(-5, 5)))
def test_default_run_folder_is_one_folder_under_runs(model, dataset, permute):
    from localitylab.train.config import TrainConfig

    run_dir = TrainConfig(model, dataset, permute_pixels=permute).run_dir()
    assert run_dir.parent == Path("runs") and run_dir.name not in (".", "..")

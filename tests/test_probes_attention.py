"""attention-distance, pe-similarity and attention-maps: analytic cases, agreement with
fully materialised attention, invariances, and the command line."""

from __future__ import annotations

import itertools
import math
import os
import platform

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from localitylab.attention import CallGeometry, TokenGeometry, attention_layers, read_attention, softmax_pieces
from localitylab.errors import UserError
from localitylab.models.pos_embed import sincos_2d
from localitylab.probes import Measurements, get_probe, load_target
from localitylab.probes.attention_distance import add_distance_rows, attention_row_values, block_row_values
from localitylab.probes.attention_maps import parse_queries
from localitylab.probes.pe_similarity import distance_spearman, linear_r2, topology_r2
from localitylab.probes.sources import select_images
from tests.cli_helpers import run_command


def brute_force_centres(grid: tuple[int, int], patch: int) -> list[tuple[float, float]]:
    return [((i + 0.5) * patch, (j + 0.5) * patch) for i in range(grid[0]) for j in range(grid[1])]


def modules(target) -> list:
    return [layer.module for layer in attention_layers(target.model)]


def whole_sequence(geometry: TokenGeometry, images: int) -> CallGeometry:
    """The call geometry of a self-attention over the model's whole token sequence."""
    prefix = torch.full((geometry.num_prefix_tokens, 2), float("nan"), dtype=torch.float64)
    centres = geometry.centres(dtype=torch.float64)
    return CallGeometry(torch.arange(geometry.num_tokens), torch.cat([prefix, centres]), centres,
                        geometry.num_prefix_tokens, torch.arange(images))


def feed(geometry: TokenGeometry, probs_for_rows, heads: int, block: int) -> pd.DataFrame:
    """Run the probe's reduction over all grid queries in blocks, with probabilities from a
    function (given as logits, as the reader does: log 0 = -inf is a masked key), and turn
    the per-image means over queries into the probe's rows."""
    where = whole_sequence(geometry, images=2)
    rows = torch.arange(geometry.num_prefix_tokens, geometry.num_tokens)
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(rows), block):
        block_rows = rows[start:start + block]
        pieces, _ = softmax_pieces(0, probs_for_rows(block_rows, heads).log(), where, block_rows)
        for key, values in block_row_values(pieces).items():
            parts.setdefault(key, []).append(values.double())
    per_image = {key: torch.cat(values, dim=2).mean(dim=2) for key, values in parts.items()}  # (images, heads)
    out = Measurements()
    add_distance_rows(out, 0, per_image, geometry, n_images=2)
    return out.to_frame("m", "attention-distance").set_index(["metric", "head"])["value"]


# --- analytic cases ---------------------------------------------------------------------------
GEOMETRY = TokenGeometry(grid=(3, 5), patch_size=2, num_prefix_tokens=1)


def test_uniform_distance_matches_brute_force_on_a_small_grid():
    centres = brute_force_centres(GEOMETRY.grid, GEOMETRY.patch_size)
    brute = sum(math.dist(a, b) for a, b in itertools.product(centres, centres)) / len(centres) ** 2
    assert GEOMETRY.uniform_distance_px() == pytest.approx(brute, rel=1e-12)


def test_identity_attention_has_distance_zero_and_ratio_zero():
    def identity(rows, heads):
        probs = torch.zeros(2, heads, len(rows), GEOMETRY.num_tokens)
        probs[:, :, torch.arange(len(rows)), rows] = 1.0
        return probs

    values = feed(GEOMETRY, identity, heads=2, block=4)
    for head in (0, 1):
        assert values[("mean_distance_px", head)] == 0.0
        assert values[("locality_ratio", head)] == 0.0
        assert values[("prefix_share", head)] == 0.0
        assert values[("entropy_norm", head)] == 0.0


def test_uniform_attention_has_the_uniform_distance_and_ratio_one():
    centres = brute_force_centres(GEOMETRY.grid, GEOMETRY.patch_size)
    brute = sum(math.dist(a, b) for a, b in itertools.product(centres, centres)) / len(centres) ** 2
    prefix_mass = 0.3

    def uniform(rows, heads):
        probs = torch.full((2, heads, len(rows), GEOMETRY.num_tokens), (1 - prefix_mass) / GEOMETRY.num_grid_tokens,
                           dtype=torch.float64)
        probs[..., 0] = prefix_mass
        return probs

    values = feed(GEOMETRY, uniform, heads=3, block=7)
    for head in range(3):
        assert values[("mean_distance_px", head)] == pytest.approx(brute, rel=1e-9)
        assert values[("uniform_distance_px", head)] == pytest.approx(brute, rel=1e-12)
        assert values[("locality_ratio", head)] == pytest.approx(1.0, rel=1e-9)
        assert values[("mean_distance_frac", head)] == pytest.approx(brute / 10, rel=1e-9)  # image side 3x5 * 2
        assert values[("prefix_share", head)] == pytest.approx(prefix_mass, rel=1e-9)
        assert values[("entropy_norm", head)] == pytest.approx(1.0, rel=1e-9)


def test_block_sums_renormalise_over_pixel_keys():
    # Half the mass on the prefix, the rest on one key at distance 5 px (3-4-5 triangle).
    geometry = TokenGeometry(grid=(4, 4), patch_size=1, num_prefix_tokens=1)
    centres = geometry.centres(dtype=torch.float64)
    probs = torch.zeros(1, 1, 1, geometry.num_tokens, dtype=torch.float64)
    probs[..., 0] = 0.5
    probs[..., 1 + 3 * 4 + 3] = 0.5  # token (3, 3); the query is token (0, 0)
    values = attention_row_values(probs, centres[:1], centres, 1)
    assert float(values["distance"][0, 0, 0]) == pytest.approx(math.hypot(3, 3))
    assert float(values["prefix"][0, 0, 0]) == pytest.approx(0.5)


# --- the real models --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_images(trained_runs):
    target, dataset = load_target(str(trained_runs["pit-n"].checkpoint), device="cpu")
    images, labels = select_images(dataset, 6, seed=1)
    return images, labels


def materialised_metrics(target, images: torch.Tensor) -> pd.Series:
    """The docs/probes.md definitions computed directly from every layer's full attention maps."""
    from timm.utils import AttentionExtract

    attention = modules(target)
    saved = [m.fused_attn for m in attention]
    for module in attention:
        module.fused_attn = False  # the softmax then exists as a tensor that hooks can see
    try:
        with torch.no_grad():
            maps = list(AttentionExtract(target.model, method="hook")(target.prepare(images)).values())
    finally:
        for module, fused in zip(attention, saved):
            module.fused_attn = fused
    target.model.eval()
    info = target.info
    prefix = info.num_prefix_tokens
    centres = np.array(brute_force_centres(info.grid, info.patch_size))
    distance = np.linalg.norm(centres[:, None, :] - centres[None, :, :], axis=-1)
    records = {}
    for layer, attn in enumerate(maps):
        attn = attn.double().numpy()[:, :, prefix:, :]  # (B, heads, grid queries, keys)
        grid = attn[..., prefix:] / attn[..., prefix:].sum(-1, keepdims=True)
        for head in range(attn.shape[1]):
            records[("mean_distance_px", layer, head)] = (grid[:, head] * distance).sum(-1).mean()
            records[("prefix_share", layer, head)] = attn[:, head, :, :prefix].sum(-1).mean()
            logs = np.log(np.where(grid[:, head] > 0, grid[:, head], 1.0))
            records[("entropy_norm", layer, head)] = (-(grid[:, head] * logs).sum(-1) / np.log(len(centres))).mean()
    return pd.Series(records)


def distance_table(target, images: torch.Tensor, batch_size: int = 64, query_block: int | None = None) -> pd.DataFrame:
    labels = torch.zeros(len(images), dtype=torch.long)
    return get_probe("attention-distance").run(target, images, labels, {"query_block": query_block}, batch_size).table


def streamed_metrics(target, images: torch.Tensor, batch_size: int = 64, query_block: int | None = None) -> pd.Series:
    return distance_table(target, images, batch_size, query_block).set_index(["metric", "layer", "head"])["value"]


def timm_target(**model_kw):
    kw = {"patch_size": 2, "depth": 3, **model_kw}
    target, _ = load_target("timm:vit_tiny_patch16_224", device="cpu", model_kw=kw)
    return target


@pytest.fixture(scope="module")
def targets(trained_runs):
    pit, _ = load_target(str(trained_runs["pit-n"].checkpoint), device="cpu")
    vit, _ = load_target(str(trained_runs["vit-n/2"].checkpoint), device="cpu")
    # A timm ViT with qk-norm and registers, their rows outside pos_embed: every branch of the geometry.
    registers = timm_target(qk_norm=True, reg_tokens=2, no_embed_class=True)
    return {"pit-n": pit, "vit-n/2": vit, "timm:vit_tiny": timm_target(), "timm:vit_tiny+qknorm+reg": registers}


@pytest.mark.parametrize("name", ["pit-n", "vit-n/2", "timm:vit_tiny", "timm:vit_tiny+qknorm+reg"])
def test_streamed_equals_materialised_attention(targets, digits_images, name):
    target = targets[name]
    images = digits_images[0]
    streamed = streamed_metrics(target, images, query_block=5)
    direct = materialised_metrics(target, images)
    assert len(direct) == 3 * len(modules(target)) * modules(target)[0].num_heads
    for key, value in direct.items():
        assert streamed[key] == pytest.approx(value, abs=1e-5), key


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_default_query_blocks_keep_enough_rows_within_the_memory_cap(device):
    """The default block: the device's preferred size, but at least 64 rows (each block reads
    every key and value again) unless 64 rows would pass the cap; never past the cap, unless a
    single row does."""
    from localitylab.attention.reader import (BLOCK_ELEMENTS, MAX_BLOCK_ELEMENTS, MIN_BLOCK_ROWS,
                                              default_query_block)

    for rows, heads, keys in itertools.product([1, 4, 16, 64, 256], [1, 3, 4, 12], [17, 65, 1025, 4097, 16385, 50177]):
        per_row = rows * heads * keys
        block = default_query_block(rows, heads, keys, device)
        assert block >= 1
        assert block * per_row <= max(MAX_BLOCK_ELEMENTS, BLOCK_ELEMENTS[device], per_row)
        assert block >= BLOCK_ELEMENTS[device] // per_row
        if MIN_BLOCK_ROWS * per_row <= MAX_BLOCK_ELEMENTS:
            assert block >= MIN_BLOCK_ROWS
    assert default_query_block(1, 4, 16385, device) >= 64  # pit-n on one 128 x 128 image


@pytest.mark.parametrize("name", ["pit-n", "vit-n/2", "timm:vit_tiny+qknorm+reg"])
@pytest.mark.parametrize("queries,needs_weights", [(None, True), ("one token", True), (None, False),
                                                   ("one token", False)])
def test_probing_leaves_logits_unchanged_and_restores_everything(targets, digits_images, name, queries, needs_weights):
    """The reader computes each block's attention once, for the probe and for the module: the
    model's output equals an unprobed forward to float rounding, whether every row or one
    row is read (the others then go to the original kernel), through the torch path or the
    fused kernel (needs_weights=False); everything is restored after."""
    import torch.nn.functional as F

    target = targets[name]
    x = target.prepare(digits_images[0])
    layers = attention_layers(target.model)
    original, fused = F.scaled_dot_product_attention, [layer.module.fused_attn for layer in layers]
    rows = None if queries is None else torch.tensor([target.geometry.num_prefix_tokens + 5])
    with torch.no_grad():
        before = target.model(x)
        calls = []
        with read_attention(layers, lambda block: calls.append(block.layer), target.geometry, rows,
                            needs_weights=needs_weights):
            during = target.model(x)
        after = target.model(x)
    torch.testing.assert_close(during, before, rtol=1e-5, atol=1e-5)
    assert torch.equal(before, after)
    assert sorted(set(calls)) == list(range(len(layers)))
    with pytest.raises(RuntimeError, match="boom"):
        with read_attention(layers, lambda block: None, target.geometry):
            raise RuntimeError("boom")
    assert F.scaled_dot_product_attention is original  # restored on error too
    assert [layer.module.fused_attn for layer in layers] == fused
    assert all(not layer.module._forward_pre_hooks and not layer.module._forward_hooks for layer in layers)


@pytest.mark.parametrize("name", ["pit-n", "vit-n/2"])
def test_results_do_not_depend_on_batch_or_query_block(targets, digits_images, name):
    target = targets[name]
    images = digits_images[0]
    reference = streamed_metrics(target, images, batch_size=64)
    for batch_size, block in ((1, None), (4, 1), (3, 7), (6, 1000)):
        other = streamed_metrics(target, images, batch_size=batch_size, query_block=block)
        np.testing.assert_allclose(other.values, reference.loc[other.index].values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["pit-n", "vit-n/2", "timm:vit_tiny+qknorm+reg"])
def test_fused_kernel_equals_the_torch_path(targets, digits_images, name, monkeypatch):
    """attention-distance's table from the fused CPU kernel (flash attention accumulating the
    sums) equals the one from the reader's torch path (blocks of logits), kept as the
    reference, to 1e-5: every metric, every layer and head, prefix keys included."""
    from localitylab.attention import fused

    if not fused.load():
        pytest.skip("the fused kernel did not build on this machine")
    target, images = targets[name], digits_images[0]
    monkeypatch.setenv("LOCALITYLAB_FUSED_ATTENTION", "off")
    reference = streamed_metrics(target, images, batch_size=4)
    monkeypatch.setenv("LOCALITYLAB_FUSED_ATTENTION", "auto")
    calls = []
    kernel = fused.attention_rows
    monkeypatch.setattr(fused, "attention_rows", lambda *args, **kw: calls.append(1) or kernel(*args, **kw))
    found = streamed_metrics(target, images, batch_size=4)
    assert len(calls) == 2 * len(modules(target))  # every layer of both batches went through the kernel
    assert found.index.equals(reference.index)
    np.testing.assert_allclose(found.values, reference.values, rtol=1e-5, atol=1e-6)


def brute_force_rows(q, k, v, scale, prefix, query_centres, key_centres):
    """The kernel's answer written out in float64 from the full softmax."""
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale
    grid = logits[..., prefix:]
    grid_max = grid.amax(-1)
    weights = (grid - grid_max[..., None]).exp()
    distance = torch.cdist(query_centres.double(), key_centres.double())
    prefix_lse = logits[..., :prefix].logsumexp(-1) if prefix else torch.full_like(grid_max, float("-inf"))
    return (logits.softmax(-1) @ v.double(), grid_max, weights.sum(-1),
            (weights * (grid - grid_max[..., None])).sum(-1), (weights * distance).sum(-1), prefix_lse)


def _kernel_case(prefix: int):
    """Random logits large enough that tiles change the row maxima: 600 grid keys (a 512-key
    tile and a ragged one, a tail shorter than one vector) after `prefix` prefix keys, 45 query
    rows, values wider than the keys, anchors anywhere: (q, k, v, query centres, key centres)."""
    generator = torch.Generator().manual_seed(prefix)
    rows, keys = 45, 600 + prefix
    q = torch.randn(2, 3, rows, 16, generator=generator) * 3
    k = torch.randn(2, 3, keys, 16, generator=generator)
    v = torch.randn(2, 3, keys, 24, generator=generator)
    return q, k, v, torch.rand(rows, 2, generator=generator) * 30, torch.rand(600, 2, generator=generator) * 30


@pytest.mark.parametrize("prefix,tile", [(0, 7), (1, 64), (5, 300)])
def test_the_fused_kernel_matches_brute_force(prefix, tile):
    """Random logits large enough that tiles change the row maxima: 600 grid keys (a 512-key
    tile and a ragged one, a tail shorter than one vector), query tiles that do not divide
    the rows, values wider than the keys, anchors anywhere."""
    from localitylab.attention import fused

    if not fused.load():
        pytest.skip("the fused kernel did not build on this machine")
    q, k, v, query_centres, key_centres = _kernel_case(prefix)
    found = fused.attention_rows(q, k, v, 0.3, prefix, query_centres, key_centres, tile)
    expected = brute_force_rows(q, k, v, 0.3, prefix, query_centres, key_centres)
    for name, a, b in zip(fused.RowSums._fields, found, expected):
        if name == "prefix_lse" and not prefix:
            assert torch.isneginf(a).all()
            continue
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=name)


@pytest.mark.parametrize("prefix,tile", [(0, 7), (1, 64), (5, 300)])
def test_the_fused_kernel_on_two_threads_equals_itself_on_one_and_brute_force(prefix, tile):
    """Built with OpenMP, the kernel spreads its (image, head, query tile) items over the
    intra-op threads, each thread with its own scratch: on 2 threads every answer is the
    1-thread answer bit for bit (no item is split, so no sum changes order) and brute force's."""
    from localitylab.attention import fused

    if not fused.load():
        pytest.skip("the fused kernel did not build on this machine")
    q, k, v, query_centres, key_centres = _kernel_case(prefix)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused.attention_rows(q, k, v, 0.3, prefix, query_centres, key_centres, tile)
        torch.set_num_threads(2)
        two = fused.attention_rows(q, k, v, 0.3, prefix, query_centres, key_centres, tile)
    finally:
        torch.set_num_threads(threads)
    expected = brute_force_rows(q, k, v, 0.3, prefix, query_centres, key_centres)
    for name, a, b, c in zip(fused.RowSums._fields, two, one, expected):
        assert torch.equal(a, b), name
        if name != "prefix_lse" or prefix:
            torch.testing.assert_close(a.double(), c, rtol=1e-5, atol=1e-5 * c.abs().max().item(), msg=name)


def test_the_kernel_is_built_per_torch_version_instruction_set_and_source(monkeypatch):
    """The built library's name (its build folder) changes with the torch version, the ISA,
    the source and the torch installation, so a library built against another torch is never
    reused; a torch outside the
    tested releases is not built against at all: the torch path, said once."""
    import warnings

    from localitylab.attention import fused

    source = fused.SOURCE.read_bytes()
    name = fused.build_name(torch.__version__, "AVX512", source)
    assert name == fused.build_name(torch.__version__, "AVX512", source)
    others = {fused.build_name("2.15.0", "AVX512", source), fused.build_name(torch.__version__, "AVX2", source),
              fused.build_name(torch.__version__, "AVX512", source + b"// changed"),
              fused.build_name(torch.__version__, "AVX512", source, "/another/venv/site-packages/torch")}
    assert name not in others and len(others) == 4
    assert name.isidentifier()
    assert fused.tested_torch("2.14.1+cu130") and fused.tested_torch("2.14.0")
    assert not fused.tested_torch("2.13.0") and not fused.tested_torch("3.0.0+cpu")
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    fused.load.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert fused.load() is False
        assert ["built only for torch 2.14 (this is torch 2.99.0)" in str(w.message) for w in caught] == [True]
    finally:
        fused.load.cache_clear()


def test_the_fused_kernel_answers_only_what_it_computes(monkeypatch):
    """Masks, causal attention, float64 and GPUs go to the torch path; so does everything
    with LOCALITYLAB_FUSED_ATTENTION=off."""
    from localitylab.attention import fused

    q = torch.zeros(1, 1, 4, 8)
    if fused.load():
        assert fused.applies(q, None, False)
    assert not fused.applies(q, torch.ones(4, 4, dtype=torch.bool), False)
    assert not fused.applies(q, None, True)
    assert not fused.applies(q.double(), None, False)
    assert not fused.applies(q.to("meta"), None, False)
    monkeypatch.setenv("LOCALITYLAB_FUSED_ATTENTION", "off")
    assert not fused.applies(q, None, False)


def test_remembered_attention_layers_follow_the_model_and_do_not_keep_it_alive():
    """attention_layers remembers what it found per model: a changed module tree is walked
    again, and a model nobody holds is still freed."""
    import gc
    import weakref

    model = timm_target(depth=2).model
    first = attention_layers(model)
    assert [layer.name for layer in first] == ["blocks.0.attn", "blocks.1.attn"]
    model.blocks = model.blocks[:1]
    assert [layer.name for layer in attention_layers(model)] == ["blocks.0.attn"]
    alive = weakref.ref(model)
    del model, first
    gc.collect()
    assert alive() is None


WITHOUT_COMPILER = """
import warnings, torch
from localitylab.attention import fused
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    built = fused.load()
print(built, fused.applies(torch.zeros(1, 1, 4, 8), None, False))
print(" | ".join(str(w.message) for w in caught))
"""


def test_without_a_compiler_the_reader_takes_the_torch_path(tmp_path):
    """Where the kernel cannot be built (no compiler on PATH, nothing built before), loading
    says so once and the reader does not use it."""
    import subprocess
    import sys

    env = {**os.environ, "PATH": str(tmp_path), "TORCH_EXTENSIONS_DIR": str(tmp_path / "build")}
    env.pop("CXX", None)
    result = subprocess.run([sys.executable, "-c", WITHOUT_COMPILER], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    verdict, messages = result.stdout.strip().splitlines()[-2:]
    assert verdict == "False False"
    assert "attention probes use the torch path: the fused CPU kernel did not build" in messages


def test_query_block_option_is_checked(targets, digits_images):
    probe = get_probe("attention-distance")
    with pytest.raises(UserError, match="query_block"):
        probe.run(targets["pit-n"], *digits_images, {"query_block": 0})


# --- pe-similarity ----------------------------------------------------------------------------
def pe_scores(target) -> dict[str, float]:
    images = torch.zeros(1, target.spec.in_chans, target.spec.img_size, target.spec.img_size, dtype=torch.uint8)
    table = get_probe("pe-similarity").run(target, images, torch.zeros(1, dtype=torch.long)).table
    return dict(zip(table["metric"], table["value"]))


@pytest.mark.parametrize("name", ["pit-n", "vit-n/2"])
def test_sincos_embeddings_encode_the_grid(name):
    target, _ = load_target(name, device="cpu", pos_embed="sincos")
    scores = pe_scores(target)
    assert scores["pe_distance_spearman"] > 0.8
    assert scores["pe_topology_r2"] > 0.95
    assert scores["pe_linear_r2"] > 0.95


@pytest.mark.parametrize("std", [0.02, 1.0])
def test_random_embeddings_encode_nothing(std):
    target, _ = load_target("pit-n", device="cpu", model_kw={"pos_embed_std": std}, seed=3)
    scores = pe_scores(target)
    assert abs(scores["pe_distance_spearman"]) < 0.1
    assert scores["pe_topology_r2"] < 0.15
    assert scores["pe_linear_r2"] < 0.2


def test_pe_scores_on_a_large_grid_sample_pairs_and_rows():
    geometry = TokenGeometry(grid=(32, 32), patch_size=1, num_prefix_tokens=1)
    sincos = sincos_2d(64, 32, 32)
    rho, note = distance_spearman(sincos, geometry, seed=0)
    # The 200k-pair sample estimates the all-pairs value (523,776 pairs, computed here).
    unit = torch.nn.functional.normalize(sincos.double(), dim=1)
    first, second = torch.triu_indices(1024, 1024, offset=1)
    centres = geometry.centres(dtype=torch.float64)
    exact = spearmanr((unit[first] * unit[second]).sum(1), -(centres[first] - centres[second]).norm(dim=1)).statistic
    assert rho == pytest.approx(exact, abs=0.01) and "sampled" in note
    assert rho > 0.6  # lower than on small grids: sin-cos similarity is not monotone in distance far away
    r2, note = topology_r2(sincos, geometry, seed=0)
    assert r2 > 0.95 and "sampled" in note
    random_rho, _ = distance_spearman(torch.randn(1024, 64, generator=torch.Generator().manual_seed(0)), geometry, 0)
    assert abs(random_rho) < 0.05


def test_pe_rows_skip_the_prefix_unless_no_embed_class():
    for no_embed_class in (False, True):
        target = timm_target(reg_tokens=2, no_embed_class=no_embed_class)
        rows = target.model.pos_embed.shape[1]
        assert rows == 16 + (0 if no_embed_class else 3)
        with torch.no_grad():  # plant a sin-cos table in the grid rows, noise in the prefix rows
            target.model.pos_embed[0, rows - 16:] = sincos_2d(192, 4, 4)
            target.model.pos_embed[0, :rows - 16] = torch.randn(rows - 16, 192) * 10
        assert pe_scores(target)["pe_linear_r2"] > 0.95
    assert linear_r2(sincos_2d(64, 4, 4), TokenGeometry((4, 4), 2, 1), 0)[0] > 0.95


# --- not applicable ---------------------------------------------------------------------------
@pytest.mark.parametrize("probe_name", ["attention-distance", "pe-similarity", "attention-maps"])
def test_convnet_gets_a_does_not_apply_row(trained_runs, probe_name):
    target, dataset = load_target(str(trained_runs["resnet-n"].checkpoint), device="cpu")
    images, labels = select_images(dataset, 2)
    table = get_probe(probe_name).run(target, images, labels).table
    assert len(table) == 1 and pd.isna(table["value"].iloc[0]) and "does not apply" in table["note"].iloc[0]


def test_no_position_embedding_gets_a_does_not_apply_row():
    target, dataset = load_target("pit-n", device="cpu", pos_embed="none")
    images, labels = select_images(dataset, 2)
    table = get_probe("pe-similarity").run(target, images, labels).table
    assert len(table) == 1 and "pos_embed none" in table["note"].iloc[0]
    # attention still applies without a position embedding
    assert get_probe("attention-distance").not_applicable(target) is None


# --- attention-maps ---------------------------------------------------------------------------
def test_query_parsing():
    geometry = TokenGeometry(grid=(4, 4), patch_size=2, num_prefix_tokens=1)
    assert parse_queries(None, geometry) == [(4, 4)]
    assert parse_queries(" 1,2 ; 7,0", geometry) == [(1, 2), (7, 0)]
    assert parse_queries((3, 5), geometry) == [(3, 5)]
    assert geometry.token_of_pixel(7, 0) == 1 + 3 * 4 + 0
    for bad in ("8,0", "0,-1", "1", "a,b", "1,2,3", "1,2;", ""):
        with pytest.raises(UserError, match="row,col"):
            parse_queries(bad, geometry)


def test_attention_maps_agree_with_attention_distance(targets, digits_images):
    # A single query's attended distance, averaged over every pixel as the query, is the
    # mean attention distance: the two probes share one extraction path.
    target = targets["vit-n/2"]
    images, labels = digits_images
    every_pixel_of_row_0 = ";".join(f"0,{c}" for c in range(8))
    table = get_probe("attention-maps").run(target, images, labels, {"query": every_pixel_of_row_0}).table
    per_query = table[(table["metric"] == "query_distance_px") & table["head"].notna()]
    mean_over_queries = per_query.groupby(["layer", "head"])["value"].mean()
    # Pixels (0, 2c) and (0, 2c+1) share a token, so this is the mean over tokens of row 0.
    geometry = target.geometry
    rows = torch.arange(1, 1 + geometry.grid[1])
    direct = {}

    def consume(block):  # one block: the 4 tokens of row 0
        direct[block.layer] = block_row_values(block)["distance"].double().mean(dim=(0, 2))

    with torch.no_grad(), read_attention(attention_layers(target.model), consume, geometry, rows):
        target.model(target.prepare(images))
    for (layer, head), value in mean_over_queries.items():
        assert value == pytest.approx(float(direct[layer][head]), rel=1e-5)
    mass = table[(table["metric"] == "neighbourhood_mass") & table["head"].notna()]["value"]
    assert ((mass > 0) & (mass <= 1 + 1e-6)).all()


# --- the command line -------------------------------------------------------------------------
def cli(*args):
    return run_command(*args)


def test_cli_attention_distance_on_a_convnet_says_it_does_not_apply(trained_runs, tmp_path):
    result = cli("probe", "attention-distance", str(trained_runs["resnet-n"].checkpoint), "--images", "2",
                 "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "does not apply" in result.stdout
    assert (tmp_path / "attention-distance.csv").is_file()


def test_cli_attention_maps_writes_table_meta_and_figure(trained_runs, tmp_path):
    out = tmp_path / "maps"
    result = cli("probe", "attention-maps", str(trained_runs["pit-n"].checkpoint), "--query", "4,4", "--images", "4",
                 "--per-head", "--out", str(out))
    assert result.returncode == 0, result.stderr
    names = {p.name for p in out.iterdir()}
    assert {"attention-maps.csv", "meta.json", "attention-maps-q4-4.png", "attention-maps-q4-4-heads.png"} <= names
    bad = cli("probe", "attention-maps", str(trained_runs["pit-n"].checkpoint), "--query", "4,99", "--out",
              str(tmp_path / "bad"))
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("localitylab: error:") and "row,col" in lines[0], bad.stderr


def test_plot_overlays_several_tables(targets, digits_images, tmp_path):
    from localitylab.probes.output import read_table, write_table

    paths = []
    for name in ("pit-n", "vit-n/2"):
        table = get_probe("attention-distance").run(targets[name], *digits_images).table
        paths.append(write_table(table, tmp_path / name.replace("/", "-") / "attention-distance.csv"))
    figures = get_probe("attention-distance").plot([read_table(p) for p in paths], tmp_path)
    assert [f.name for f in figures] == ["attention-distance.png"] and figures[0].stat().st_size > 0
    result = cli("plot", "attention-distance", *map(str, paths), "--out", str(tmp_path / "cli"))
    assert result.returncode == 0 and (tmp_path / "cli" / "attention-distance.png").is_file(), result.stderr


def test_compiled_reductions_agree_with_the_eager_ones(monkeypatch):
    """Long sequences reduce their blocks with torch.compile'd functions (`attention.compiled`):
    the same numbers as the eager functions, masked keys included."""
    from localitylab.attention import compiled as compiled_module
    from localitylab.attention.compiled import compiled, grid_pieces, weighted_distance

    monkeypatch.setenv("LOCALITYLAB_COMPILE_ATTENTION", "on")
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 40, generator=generator) * 4
    logits[0, 1, 2, :7] = float("-inf")  # masked keys
    centres = torch.rand(5, 2, generator=generator) * 8, torch.rand(40, 2, generator=generator) * 8
    eager = grid_pieces(logits)
    found = compiled(grid_pieces, 40)(logits)
    for a, b in zip(eager, found):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled(weighted_distance, 40)(eager[0], *centres), weighted_distance(eager[0], *centres),
                               rtol=1e-5, atol=1e-5)
    assert compiled_module._COMPILED["grid_pieces"] is not None  # compiled, not the eager fallback


MAPPED_WHILE_ALIVE = """
import ctypes, sys
import torch
from localitylab.attention import attention_layers, read_attention, TokenGeometry
from localitylab.models.registry import ModelSpec, build_model

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "read":  # the reader's first use sets the heap thresholds
    model = build_model(ModelSpec("pit-n", 4, 1, 10, "learn")).eval()
    with torch.no_grad(), read_attention(attention_layers(model), lambda block: None, TokenGeometry((4, 4), 1, 1)):
        model(torch.zeros(1, 1, 4, 4))
before = libc.mallinfo2().hblkhd
block = torch.empty(48 << 20, dtype=torch.uint8)
print((libc.mallinfo2().hblkhd - before) >> 20)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_the_reader_keeps_block_temporaries_on_the_heap():
    """A 48 MiB temporary is above glibc's largest adaptive threshold (32 MiB), so malloc maps
    it afresh, and faults it in, every time; once the reader has run it comes from the heap.
    A user's own malloc tuning is left as it is."""
    def mapped_mib(*args, env=None) -> int:
        result = run_command("-c", MAPPED_WHILE_ALIVE, *args, module=None, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        return int(result.stdout.split()[-1])

    assert mapped_mib("plain") == 48
    assert mapped_mib("read") == 0
    assert mapped_mib("read", env={"MALLOC_MMAP_THRESHOLD_": "1000000"}) == 48

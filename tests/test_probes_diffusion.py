"""Attention probes on diffusion transformers: the DiT's attention read exactly, at each
noise level, and its prediction unchanged by probing."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from localitylab.attention import attention_layers, read_attention
from localitylab.errors import UserError
from localitylab.probes.registry import get_probe
from localitylab.probes.target import check_timesteps
from localitylab.probes.sources import load_target, select_images


@pytest.fixture(scope="module")
def dit_target():
    """An untrained dit-n/2 with every weight drawn at random (its adaLN-Zero layers would
    otherwise make every block the identity), on digits."""
    target, dataset = load_target("dit-n/2", device="cpu", data="digits", pos_embed="learn")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in target.model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.15)
    images, labels = select_images(dataset, 6, seed=1)
    return target, images, labels


def materialised_distances(target, images, labels, timestep, seed) -> pd.Series:
    """mean_distance_px per (layer, head) from attention maps built by hand: each attn1's
    input, its to_q / to_k weights, softmax(q k^T / sqrt(head_dim)), every map whole."""
    inputs = []
    hooks = [layer.module.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
             for layer in attention_layers(target.model)]
    noisy, timesteps = target.denoising.noised(target.prepare(images), timestep, seed, 0)
    try:
        with torch.no_grad():
            target.model(noisy, timesteps, labels)
    finally:
        for hook in hooks:
            hook.remove()
    grid = target.info.grid
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    centres = (np.stack([rows.ravel(), cols.ravel()], 1) + 0.5) * target.info.patch_size
    distance = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    records = {}
    for layer, (x, attention) in enumerate(zip(inputs, (layer.module for layer in attention_layers(target.model)))):
        heads = attention.heads
        x = x.detach().double()
        q = x @ attention.to_q.weight.detach().double().T + attention.to_q.bias.detach().double()
        k = x @ attention.to_k.weight.detach().double().T + attention.to_k.bias.detach().double()
        q = q.view(len(x), -1, heads, q.shape[-1] // heads).transpose(1, 2)
        k = k.view(len(x), -1, heads, k.shape[-1] // heads).transpose(1, 2)
        maps = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1).numpy()
        for head in range(heads):
            records[(layer, head)] = (maps[:, head] * distance).sum(-1).mean()
    return pd.Series(records)


@pytest.mark.parametrize("timestep", [999, 100, 0])
def test_the_dit_attention_is_read_exactly_at_each_noise_level(dit_target, timestep):
    target, images, labels = dit_target
    table = get_probe("attention-distance").run(target, images, labels, {"query_block": 3}, batch_size=4, seed=2,
                                                timesteps=[timestep]).table
    assert set(table["setting"]) == {f"t={timestep}"}
    streamed = table[table["metric"] == "mean_distance_px"].dropna(subset=["head"]).set_index(["layer", "head"])["value"]
    direct = materialised_distances(target, images, labels, timestep, seed=2)
    assert len(direct) == 4 * 4
    for key, value in direct.items():
        assert streamed[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key  # float32 logits


def test_noise_levels_change_the_attention_and_share_their_noise(dit_target):
    target, images, labels = dit_target
    table = get_probe("attention-distance").run(target, images, labels, timesteps=[999, 10], batch_size=6).table
    ratio = table[(table["metric"] == "locality_ratio") & table["head"].notna()].groupby("setting")["value"].mean()
    assert set(ratio.index) == {"t=999", "t=10"} and ratio["t=999"] != ratio["t=10"]
    # Each level is the same per-image noise at another scale: eps recovered from x_t is one tensor.
    clean = target.prepare(images)
    abar = target.denoising.objective.scheduler.alphas_cumprod.double()
    eps = [(x.double() - abar[t].sqrt() * clean) / (1 - abar[t]).sqrt()
           for t in (999, 10) for x in [target.denoising.noised(clean, t, seed=0, first=0)[0]]]
    torch.testing.assert_close(eps[0], eps[1], atol=1e-4, rtol=0)


def test_probing_leaves_the_denoisers_prediction_unchanged(dit_target):
    import torch.nn.functional as F

    target, images, labels = dit_target
    noisy, timesteps = target.denoising.noised(target.prepare(images), 500, seed=0, first=0)
    layers = attention_layers(target.model)
    processors = [layer.module.processor for layer in layers]
    original = F.scaled_dot_product_attention
    with torch.no_grad():
        before = target.model(noisy, timesteps, labels)
        seen = []
        with read_attention(layers, lambda block: seen.append(block.layer), target.geometry):
            during = target.model(noisy, timesteps, labels)
        after = target.model(noisy, timesteps, labels)
    torch.testing.assert_close(during, before, rtol=1e-5, atol=1e-5)
    assert torch.equal(before, after) and sorted(set(seen)) == list(range(len(layers)))
    assert F.scaled_dot_product_attention is original
    assert [layer.module.processor for layer in layers] == processors


def test_the_plain_diffusers_processor_is_read_and_a_custom_one_refused(dit_target):
    from diffusers.models.attention_processor import AttnProcessor

    target, images, labels = dit_target
    layer = attention_layers(target.model)[0]
    saved = layer.module.processor
    try:
        layer.module.processor = AttnProcessor()  # baddbmm and softmax, no SDPA
        with torch.no_grad():
            unprobed = target.model(*target_inputs(target, images, labels))
            blocks = []
            with read_attention([layer], blocks.append, target.geometry):
                probed = target.model(*target_inputs(target, images, labels))
        assert blocks and isinstance(layer.module.processor, AttnProcessor)
        torch.testing.assert_close(probed, unprobed, rtol=1e-5, atol=1e-5)

        class Custom:
            def __call__(self, attn, hidden_states, *args, **kwargs):
                return hidden_states

        layer.module.processor = Custom()
        with pytest.raises(UserError, match="processor Custom cannot be read"):
            with read_attention([layer], blocks.append, target.geometry):
                pass
    finally:
        layer.module.processor = saved


def target_inputs(target, images, labels):
    noisy, timesteps = target.denoising.noised(target.prepare(images), 300, seed=0, first=0)
    return noisy, timesteps, labels


def test_every_attention_probe_reports_each_level_and_the_rest_say_why_not(dit_target):
    target, images, labels = dit_target
    maps = get_probe("attention-maps").run(target, images, labels, timesteps=[999, 10]).table
    assert set(maps["setting"]) == {"t=999, query=4,4", "t=10, query=4,4"}
    pe = get_probe("pe-similarity").run(target, images, labels, timesteps=[999, 10]).table
    assert set(pe["setting"]) == {""} and pe["value"].notna().all()  # the table alone: once
    for name in ("permutation", "receptive-field", "mae-reconstruction"):
        table = get_probe(name).run(target, images, labels).table
        assert table["value"].isna().all() and "is a denoiser" in table["note"].iloc[0]


def test_default_levels_and_bad_timesteps(dit_target):
    target, images, labels = dit_target
    assert target.denoising.levels(None) == [999, 500, 100, 10]
    with pytest.raises(UserError, match="from 0 to 999"):
        check_timesteps(target, [1000])
    classifier, _ = load_target("pit-n", device="cpu", data="digits")
    with pytest.raises(UserError, match="applies to diffusion models"):
        check_timesteps(classifier, [10])

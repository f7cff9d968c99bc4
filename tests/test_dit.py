"""Diffusion transformers (`dit-*/P`): the DiT paper's architecture on diffusers' model."""

from __future__ import annotations

import pytest
import torch

from localitylab.data.permutation import permute_pixels, random_permutation
from localitylab.errors import UserError
from localitylab.models import ModelSpec, build_model, describe_model


def dit(name="dit-n/2", img=8, chans=1, classes=10, pos="sincos", meta=False, **kw):
    spec = ModelSpec(name, img, chans, classes, pos, kw)
    if meta:
        with torch.device("meta"):
            return build_model(spec)
    return build_model(spec)


def randomise(model, seed=0):
    """Every trainable weight drawn at random, so no zero-initialised layer hides a bug."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model


def inputs(model, batch=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    noisy = torch.randn((batch, model.in_chans, model.img_size, model.img_size), generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    labels = torch.randint(0, model.num_classes + 1, (batch,), generator=generator)  # the null class included
    return noisy, timesteps, labels


def dit_parameter_count(width, depth, patch, chans, classes):
    """The DiT paper's model counted by hand (facebookresearch/DiT, models.py), with a fixed
    (non-parameter) sin-cos table and a noise-only output of `chans` channels."""
    patch_embed = chans * patch * patch * width + width
    timestep_embedder = 256 * width + width + width * width + width
    label_embedder = (classes + 1) * width  # + the null class
    block = (width * 3 * width + 3 * width) + (width * width + width) + (width * 4 * width + 4 * width) \
        + (4 * width * width + width) + (width * 6 * width + 6 * width)  # qkv, proj, fc1, fc2, adaLN
    final = (width * 2 * width + 2 * width) + (width * patch * patch * chans + patch * patch * chans)
    return patch_embed + timestep_embedder + label_embedder + depth * block + final


# The DiT paper's Table 4 (32x32x4 latents, 1,000 classes). Its counts include the sin-cos
# table (a frozen nn.Parameter there: 256 x width) and an 8-channel output (the learned
# variance), under 0.5% together.
@pytest.mark.parametrize("name, width, depth, params_m", [("dit-s/2", 384, 12, 33.0), ("dit-b/2", 768, 12, 130.3),
                                                          ("dit-l/2", 1024, 24, 458.1), ("dit-xl/2", 1152, 28, 675.1)])
def test_dit_has_the_papers_parameter_counts(name, width, depth, params_m):
    # One timestep-and-label embedder shared by all blocks, as in the paper; diffusers' class
    # alone builds one per block, which would add about 10% to these counts.
    info = describe_model(dit(name, img=32, chans=4, classes=1000, meta=True))
    assert info.params == dit_parameter_count(width, depth, 2, 4, 1000)
    assert info.params / 1e6 == pytest.approx(params_m, rel=0.005)
    assert info.patch_size == 2 and info.grid == (16, 16) and info.num_prefix_tokens == 0


def test_every_block_reads_one_conditioning_embedder():
    model = dit()
    embedders = {id(block.norm1.emb) for block in model.blocks}
    assert len(embedders) == 1


def test_adaln_zero_starts_every_block_as_the_identity_and_predicts_zero_noise():
    model = dit()
    noisy, timesteps, labels = inputs(model)
    tokens = torch.randn(3, 16, 64)
    for block in model.blocks:
        assert torch.equal(block(tokens, timestep=timesteps, class_labels=labels), tokens)
    assert torch.equal(model(noisy, timesteps, labels), torch.zeros_like(noisy))


def test_the_model_never_drops_labels_itself():
    """Classifier-free guidance needs one dropout decision per image, drawn by the objective;
    diffusers' label embedder would drop labels at random in every block in train mode."""
    model = randomise(dit())
    noisy, timesteps, labels = inputs(model, batch=64)
    expected = model.eval()(noisy, timesteps, labels)
    model.train()
    for _ in range(3):
        assert torch.equal(model(noisy, timesteps, labels), expected)
    # ... and the null class is a label of its own.
    null = torch.full_like(labels, model.null_class)
    assert not torch.allclose(model(noisy, timesteps, null), expected)


def test_position_embeddings():
    sincos, learn, none = dit(pos="sincos"), dit(pos="learn"), dit(pos="none")
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    assert torch.equal(sincos.pos_embed[0], get_2d_sincos_pos_embed(64, 4, base_size=4).float())
    assert not isinstance(sincos.pos_embed, torch.nn.Parameter)
    assert isinstance(learn.pos_embed, torch.nn.Parameter) and learn.pos_embed.requires_grad
    assert none.pos_embed is None
    assert [describe_model(m).pos_embed for m in (sincos, learn, none)] == ["sincos", "learn", "none"]
    assert "transformer.pos_embed.pos_embed" in learn.state_dict()


@pytest.mark.parametrize("pos", ["sincos", "learn", "none"])
def test_state_dict_round_trip(pos):
    model = randomise(dit("dit-n/1", pos=pos), seed=3)
    twin = dit("dit-n/1", pos=pos)
    twin.load_state_dict(model.state_dict())
    noisy, timesteps, labels = inputs(model)
    assert torch.equal(twin(noisy, timesteps, labels), model(noisy, timesteps, labels))


@pytest.mark.parametrize("pos", ["learn", "sincos"])
def test_pixel_tokens_make_the_dit_equivariant_to_a_pixel_permutation(pos):
    """P = 1: permuting the input pixels and the position-embedding rows by one permutation
    permutes the predicted noise by the same permutation, to float rounding."""
    model = randomise(dit("dit-n/1", pos=pos), seed=4).eval()
    permutation = random_permutation(64, seed=5)
    noisy, timesteps, labels = inputs(model)
    expected = permute_pixels(model(noisy, timesteps, labels), permutation)
    unmoved_rows = model(permute_pixels(noisy, permutation), timesteps, labels)
    with torch.no_grad():
        model.pos_embed[0] = model.pos_embed[0, permutation].clone()
    got = model(permute_pixels(noisy, permutation), timesteps, labels)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max()
    # The position rows carry the geometry: without moving them, the output is another one.
    assert (unmoved_rows - expected).abs().max() > 0.1 * expected.abs().max()


def test_patches_break_the_equivariance_when_pixels_leave_their_patch():
    model = randomise(dit("dit-n/2", pos="learn"), seed=4).eval()
    permutation = random_permutation(64, seed=5)
    noisy, timesteps, labels = inputs(model)
    expected = permute_pixels(model(noisy, timesteps, labels), permutation)
    got = model(permute_pixels(noisy, permutation), timesteps, labels)
    assert (got - expected).abs().max() > 0.1 * expected.abs().max()


@pytest.mark.parametrize("name, kw, message", [
    ("dit-n/3", {}, "not divisible by patch size 3"),
    ("dit-n", {}, "needs a patch size"),
    ("dit-n/2", {"mlp_ratio": 2}, "unknown model_kw 'mlp_ratio'"),
    ("dit-n/2", {"width": 30}, "multiple of heads"),
])
def test_impossible_dits_are_user_errors(name, kw, message):
    with pytest.raises(UserError, match=message):
        dit(name, **kw)


def test_model_kw_sets_the_dimensions():
    info = describe_model(dit("dit-n/4", width=32, depth=2, heads=2))
    assert info.grid == (2, 2)
    small = dit("dit-n/4", width=32, depth=2, heads=2)
    assert len(small.blocks) == 2 and small.blocks[0].attn1.heads == 2


def test_forward_flops_equal_a_count_by_hand():
    """count_flops runs a denoiser with a noise level and a label, and sees every matmul."""
    from localitylab.models.describe import count_flops

    side, chans, width, depth, patch, classes = 8, 1, 64, 4, 2, 10
    tokens = (side // patch) ** 2
    embed = 2 * tokens * chans * patch * patch * width
    conditioning = 2 * (256 * width + width * width)  # the timestep MLP, once per block and once at the end
    per_block = 2 * width * 6 * width + 2 * tokens * width * width * (3 + 1 + 4 + 4) + 2 * (2 * tokens * tokens * width)
    final = 2 * width * 2 * width + 2 * tokens * width * patch * patch * chans
    model = dit("dit-n/2", img=side, chans=chans, classes=classes)
    assert count_flops(model, chans, side) == embed + (depth + 1) * conditioning + depth * per_block + final

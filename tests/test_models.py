"""The model registry: every model builds with the right shape, tokens and size."""

from __future__ import annotations

import pytest
import torch

from localitylab.errors import UserError
from localitylab.models import ModelSpec, build_model, describe_model, model_entries, parse_model_name
from localitylab.models.pos_embed import sincos_2d


def build(name, img=32, chans=3, classes=100, pos="learn", meta=False, **kw):
    spec = ModelSpec(name, img, chans, classes, pos if not name.startswith("resnet") else None, kw)
    if meta:
        with torch.device("meta"):
            return build_model(spec)
    return build_model(spec)


@pytest.mark.parametrize(
    "name, patch, tokens, params_m",
    [
        # PiT paper: PiT-T ~5.5M at 32x32 (the 1,024-row position table adds ~0.2M to ViT-T).
        ("pit-t", 1, 32 * 32 + 1, (5.5, 5.8)),
        ("pit-s", 1, 1025, (21.5, 22.3)),
        ("pit-b", 1, 1025, (85.5, 87.0)),
        ("vit-t/2", 2, 16 * 16 + 1, (5.3, 5.6)),
        ("vit-s/4", 4, 8 * 8 + 1, (21.3, 21.9)),
        ("vit-t/8", 8, 4 * 4 + 1, (5.3, 5.6)),
        ("pit-n", 1, 1025, (0.2, 0.4)),
    ],
)
def test_transformers_have_the_published_shapes(name, patch, tokens, params_m):
    info = describe_model(build(name, meta=True))
    assert info.patch_size == patch
    assert info.tokens_per_image == tokens
    assert info.num_prefix_tokens == 1  # the [cls] token
    assert params_m[0] <= info.params / 1e6 <= params_m[1]


def test_every_registry_model_builds_and_runs_forward():
    for entry in model_entries():
        name = f"{entry.name}/4" if entry.takes_patch else entry.name
        if not name.endswith("-n") and not name.endswith("-n/4"):
            build(name, meta=True)  # large ones: shapes only
            continue
        model = build(name, img=16, chans=3, classes=7)
        if entry.kind == "dit":  # a denoiser: (noisy images, timesteps, labels) -> predicted noise
            noisy = torch.randn(2, 3, 16, 16)
            assert model(noisy, torch.tensor([0, 999]), torch.tensor([0, 6])).shape == noisy.shape
            continue
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 7)


def test_resnet_keeps_full_resolution_in_its_stem():
    model = build("resnet-n", img=8, chans=1, classes=10)
    stem = model.act1(model.bn1(model.conv1(torch.randn(1, 1, 8, 8))))
    assert stem.shape[-2:] == (8, 8)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert 10e6 < describe_model(build("resnet-18", meta=True)).params < 12e6


def test_sincos_embedding_is_the_fixed_table_and_is_not_trained():
    model = build("pit-n", img=8, chans=1, classes=10, pos="sincos")
    table = sincos_2d(64, 8, 8)
    assert torch.equal(model.pos_embed[0, 1:], table)
    assert torch.equal(model.pos_embed[0, 0], torch.zeros(64))
    assert not model.pos_embed.requires_grad
    assert describe_model(model).pos_embed == "sincos"
    # Independent check of one entry: row (i, j), column-frequency channel k.
    i, j, k = 3, 5, 2
    omega = 1.0 / 10000 ** (k / 16)
    assert table[i * 8 + j, k].item() == pytest.approx(torch.sin(torch.tensor(i * omega, dtype=torch.float64)).item(), abs=1e-6)
    assert table[i * 8 + j, 32 + 16 + k].item() == pytest.approx(torch.cos(torch.tensor(j * omega, dtype=torch.float64)).item(), abs=1e-6)


def test_no_position_embedding_keeps_the_cls_token():
    model = build("pit-n", img=8, chans=1, classes=10, pos="none")
    assert model.pos_embed is None
    assert model.cls_token is not None and model.num_prefix_tokens == 1
    assert model.forward_features(torch.randn(2, 1, 8, 8)).shape == (2, 65, 64)


def test_pixel_tokens_are_single_pixels():
    model = build("pit-n", img=8, chans=3, classes=10)
    assert model.patch_embed.proj.kernel_size == (1, 1)
    assert model.patch_embed.grid_size == (8, 8)


def test_timm_models_get_shapes_from_the_data():
    vit = build("timm:vit_tiny_patch16_224", img=32, chans=1, classes=10, patch_size=4)
    assert vit(torch.randn(1, 1, 32, 32)).shape == (1, 10)
    convnet = build("timm:resnet18", img=32, chans=1, classes=10).eval()
    assert convnet(torch.randn(1, 1, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize(
    "name, message",
    [
        ("vit-t/3", "not divisible by patch size 3"),
        ("vit-t", "needs a patch size"),
        ("pit-t/2", "takes no patch size"),
        ("pit-x", "unknown model"),
        ("timm:not_a_model_at_all", "unknown timm model"),
        ("timm:", "needs a model name"),
    ],
)
def test_impossible_models_are_user_errors(name, message):
    with pytest.raises(UserError, match=message):
        build(name, img=32)


def test_unknown_position_embedding_is_a_user_error():
    with pytest.raises(UserError, match="learn, sincos, none"):
        build("pit-n", pos="rope")


def test_names_parse():
    assert parse_model_name("vit-t/2") == ("vit-t", 2)
    assert parse_model_name("pit-s") == ("pit-s", None)
    assert parse_model_name("timm:deit_tiny_patch16_224") == ("timm:deit_tiny_patch16_224", None)


@pytest.mark.parametrize("name, patch", [("pit-n", 1), ("vit-n/4", 4)])
def test_forward_flops_equal_a_count_by_hand_attention_included(name, patch):
    """count_flops sees attention on every torch version and device: the fused CPU kernel
    has no FLOP formula in some versions, which would silently drop Q K^T and A V."""
    from localitylab.models.describe import count_flops

    side, chans, dim, depth, classes = 16, 3, 64, 4, 10
    grid = (side // patch) ** 2
    tokens = grid + 1
    embed = 2 * grid * chans * patch * patch * dim
    linear = depth * 2 * tokens * dim * dim * (3 + 1 + 4 + 4)  # qkv, proj, fc1, fc2
    attention = depth * 2 * (2 * tokens * tokens * dim)  # Q K^T and A V over all heads
    model = build(name, img=side, chans=chans, classes=classes)
    assert count_flops(model, chans, side) == embed + linear + attention + 2 * dim * classes

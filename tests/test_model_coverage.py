"""Models the toolkit cannot describe or read never crash; hybrid ViTs sit at their true token
spacing; and scripts/model_coverage.py (docs/model-coverage.md) on a fast subset."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from localitylab.models.describe import describe_model

ROOT = Path(__file__).resolve().parents[1]


def load_coverage_script():
    spec = importlib.util.spec_from_file_location("model_coverage", ROOT / "scripts" / "model_coverage.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["model_coverage"] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def test_hybrid_vit_tokens_sit_at_the_backbone_stride_times_the_patch():
    """timm's HybridEmbed cuts 1 x 1 patches from a ResNet's stride-32 feature map: its tokens
    are 32 pixels apart, not 1. Counted independently by running the embedding on an image."""
    import timm

    model = timm.create_model("vit_small_r26_s32_224", pretrained=False, img_size=128, depth=1).eval()
    info = describe_model(model)
    with torch.no_grad():
        tokens = model.patch_embed(torch.zeros(1, 3, 128, 128)).shape[1]
    side = math.isqrt(tokens)
    assert side * side == tokens and info.grid == (side, side) == (4, 4)
    assert info.patch_size == 128 // side == 32
    plain = describe_model(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=1))
    assert (plain.grid, plain.patch_size) == ((4, 4), 16)
    # Patches that do not fill the image: 27 patches of 14 px from 384 px, 14 px apart (not 384 / 27)
    with torch.device("meta"):
        siglip = describe_model(timm.create_model("vit_so400m_patch14_siglip_384", pretrained=False, depth=1))
    assert (siglip.grid, siglip.patch_size) == ((27, 27), 14)


@pytest.mark.parametrize("name, note", [
    ("crossvit_tiny_240", "2 patch embeddings (ModuleList): tokens on several grids"),
    ("hiera_tiny_224", "PatchEmbed says no image size and token grid"),
])
def test_models_whose_tokens_are_not_on_one_grid_are_described_not_crashed(name, note):
    import timm

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    info = describe_model(model)
    assert info.grid is None and info.patch_size is None and info.layout_note == note


def test_xcit_grid_comes_from_its_image_and_patch_size():
    import timm

    with torch.device("meta"):
        info = describe_model(timm.create_model("xcit_nano_12_p16_224", pretrained=False))
    assert (info.grid, info.patch_size, info.num_prefix_tokens) == ((14, 14), 16, 1)


# One architecture per family the describe step used to crash on, and the families every
# probe should measure; all five probes, nothing may fail.
SUBSET = [("vision_transformer", "vit_tiny_patch16_224"), ("vision_transformer_hybrid", "vit_small_r26_s32_224"),
          ("gemma4_vit", "gemma4_vit_167m_enc"),  # an encoder (no head), whose soft pooling wants a multiple of 3
          ("crossvit", "crossvit_tiny_240"), ("xcit", "xcit_nano_12_p16_224"), ("convit", "convit_tiny"),
          ("swin_transformer", "swin_tiny_patch4_window7_224"), ("eva", "eva02_tiny_patch14_224"),
          ("cait", "cait_xxs24_224"), ("levit", "levit_128s")]


def test_coverage_subset_nothing_fails():
    """Every probe but receptive-field (seconds per model for its bootstrap) on the subset, and
    receptive-field on the hybrid, whose feature maps come from a backbone."""
    coverage = load_coverage_script()
    fast = [p for p in coverage.PROBES if p != "receptive-field"]
    table = coverage.cover(SUBSET, fast)
    hybrid = coverage.cover([SUBSET[1]], ["receptive-field"])
    assert hybrid["receptive-field"].iloc[0].startswith("measured"), hybrid["receptive-field"].iloc[0]
    assert list(table["architecture"]) == [name for _, name in SUBSET]
    for probe in fast:
        failed = table[table[probe].str.startswith("failed")]
        assert failed.empty, f"{probe} failed on: " + "; ".join(f"{a}: {o}" for a, o in zip(failed["architecture"],
                                                                                            failed[probe]))
    # Every family of the subset has an adapter now: plain, hybrid, CrossViT's branches, XCiT's class
    # attention, ConViT's GPSA, Swin's windows, EVA's rotary attention, CaiT's talking heads, LeViT's
    # stages (built for the smallest image it takes: it has no depth or width to shrink).
    measured = dict(zip(table["architecture"], table["attention-distance"].str.split(":").str[0]))
    assert set(measured.values()) == {"measured"}, measured
    built = dict(zip(table["architecture"], table["built"]))
    assert built["levit_128s"] == "img_size=64", built["levit_128s"]
    maps = dict(zip(table["architecture"], table["attention-maps"]))
    assert maps["swin_tiny_patch4_window7_224"].startswith("refused: attention-maps draws each query's attention on "
                                                            "the model's one token grid")
    text = coverage.render(table, fast, seconds=1.0)
    assert "| vision_transformer_hybrid | yes | 1 | 1 |" in text
    assert "probe runs that failed: **0**" in text


def test_an_encoder_without_a_head_is_refused_by_accuracy_and_keeps_its_receptive_field():
    """timm's `*_enc` models (num_classes = 0) return features, not class scores: permutation
    says so instead of failing, and receptive-field measures the effective receptive field
    (of the features, which the head does not touch: the same as with a head on the same
    backbone) and says why there is no class attribution."""
    import timm

    import localitylab

    torch.manual_seed(0)
    with_head = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                                  num_classes=10).eval()
    encoder = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                                num_classes=0).eval()
    encoder.load_state_dict({k: v for k, v in with_head.state_dict().items() if not k.startswith("head.")})
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 2])
    refused = localitylab.probe("permutation", encoder, images, labels)
    assert refused["value"].isna().all()
    assert refused["note"].iloc[0] == ("timm:vit_tiny_patch16_224 has no classifier head (num_classes = 0: its output is "
                                       "features, not class scores), so accuracies under shuffles do not apply")
    options = {"ig_steps": 2}
    ours = localitylab.probe("receptive-field", encoder, images, labels, options=options)
    reference = localitylab.probe("receptive-field", with_head, images, labels, options=options)
    erf = ours["metric"].str.startswith(("erf_", "uniform_"))
    assert erf.sum() > 0 and ours.loc[erf, "value"].notna().all()
    cols = ["metric", "layer", "value", "ci_low", "ci_high"]
    assert ours.loc[erf, cols].reset_index(drop=True).equals(
        reference.loc[reference["metric"].str.startswith(("erf_", "uniform_")), cols].reset_index(drop=True))
    attribution = ours[ours["metric"].str.startswith("attribution_")]
    assert len(attribution) == 4 and attribution["value"].isna().all()
    assert set(attribution["note"]) == {"timm:vit_tiny_patch16_224 has no classifier head (num_classes = 0: its output is "
                                        "features, not class scores): no class to attribute"}
    assert reference[reference["metric"].str.startswith("attribution_")]["value"].notna().all()


def test_hybrid_vit_uniform_distance_is_that_of_its_true_token_grid():
    """The audit's case: vit_small_r26_s32_224 at 64 px has a 2 x 2 grid of tokens 32 px apart;
    uniform_distance_px was 0.854 (the 1-px patch on the feature map). Brute force: the mean
    distance between the centres (16 + 32 i, 16 + 32 j) of every query and every grid key."""
    import itertools

    import timm

    import localitylab

    model = timm.create_model("vit_small_r26_s32_224", pretrained=False, img_size=64, depth=1).eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # float: already prepared
    table = localitylab.probe("attention-distance", model, images)
    rows = table[table.metric == "uniform_distance_px"]
    assert len(rows) > 0
    centres = [(16 + 32 * i, 16 + 32 * j) for i in range(2) for j in range(2)]
    brute = sum(math.dist(q, k) for q, k in itertools.product(centres, centres)) / len(centres) ** 2
    assert brute == pytest.approx((2 * 32 + 32 * math.sqrt(2)) / 4)  # 0, 32, 32, 45.3 from each query
    assert rows["value"].to_numpy() == pytest.approx(brute, rel=1e-6)

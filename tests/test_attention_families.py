"""Every attention adapter against the attention materialised independently.

The reference: each module run on its own, unfused path (fused_attn off) and its attention
maps taken with timm's AttentionExtract (forward hooks on `attn_drop`, which every module
here applies to the attention it uses); CaiT's talking heads, whose attn_drop sees the
post-softmax head mix, by an explicit softmax of the module's own proj_l-mixed logits (so too
LeViT and HieraDet, which have no attn_drop, from their own q, k and biases). The
metrics are written out here from docs/probes.md's definitions (in float64), with every token's
true pixel position: for Swin, each window's tokens are put back where the cyclic shift
took them from. Each family at two sequence lengths, with a prefix and without where the
family has both; a model that mixes attention classes keeps layer = its block index; the
model's output is unchanged by probing.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import localitylab
from localitylab.attention import TokenGeometry, attention_layers, read_attention, unread_attention_layers
from localitylab.probes.api import memory_target

# Distances in pixels relative to their size, prefix shares and normalised entropies absolute:
# both sides are float32 computations of the same attention (the reference on timm's unfused path).
TOLERANCE = 1e-5


def build(name: str, **kwargs):
    import timm

    torch.manual_seed(0)
    if "." in name:  # a class (timm's volo_* and nest_* fix their depths): built small
        import importlib

        module, cls = name.rsplit(".", 1)
        model = getattr(importlib.import_module(module), cls)(**kwargs).eval()
    else:
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
    if name.startswith("levit"):  # its initialisation is sharp already (logits in the thousands: doubling
        return model                 # every weight puts them where float32 rounding alone is 1e-4)
    with torch.no_grad():  # sharper than the initialisation: attention far from uniform
        for parameter in model.parameters():
            parameter.mul_(2.0)
    return model


def set_fused(model, value: bool) -> None:
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = value


def extracted_maps(model, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """{module name: attention} from timm's AttentionExtract on the unfused path."""
    from timm.utils import AttentionExtract

    if not any(name.endswith("attn_drop") for name, _ in model.named_modules()):
        return {}  # TinyViT: no module to hook; its attention is written out below
    set_fused(model, False)
    try:
        with torch.no_grad():
            return {name: value.double() for name, value in AttentionExtract(model, method="hook")(images).items()}
    finally:
        set_fused(model, True)


def talking_heads_softmax(module, x: torch.Tensor) -> torch.Tensor:
    """CaiT's talking heads: softmax of the proj_l-mixed logits, written out."""
    B, N, C = x.shape
    qkv = module.qkv(x).reshape(B, N, 3, module.num_heads, C // module.num_heads).permute(2, 0, 3, 1, 4)
    logits = (qkv[0] * module.scale) @ qkv[1].transpose(-2, -1)
    logits = torch.einsum("gh,bhnm->bgnm", module.proj_l.weight, logits) + module.proj_l.bias.view(1, -1, 1, 1)
    return logits.double().softmax(dim=-1)


def tiny_vit_softmax(module, x: torch.Tensor) -> torch.Tensor:
    """TinyViT: softmax(q k^T scale + its learned attention biases), written out."""
    B, N, _ = x.shape
    q, k, _ = module.qkv(module.norm(x)).view(B, N, module.num_heads, -1).split(
        [module.key_dim, module.key_dim, module.val_dim], dim=3)
    logits = (q.permute(0, 2, 1, 3) * module.scale) @ k.permute(0, 2, 3, 1)
    return (logits + module.attention_biases[:, module.attention_bias_idxs]).double().softmax(dim=-1)


def levit_softmax(module, x: torch.Tensor) -> torch.Tensor:
    """LeViT's attention and down-sampling attention: softmax(q k^T scale + learned biases),
    written out for both of its layouts (tokens (B, N, C), or feature maps (B, C, H, W))."""
    downsample = hasattr(module, "kv")
    if module.use_conv:
        B, _, H, W = x.shape
        if downsample:
            k = module.kv(x).view(B, module.num_heads, -1, H * W)[:, :, :module.key_dim]
            q = module.q(x).view(B, module.num_heads, module.key_dim, -1)
        else:
            q, k, _ = module.qkv(x).view(B, module.num_heads, -1, H * W).split(
                [module.key_dim, module.key_dim, module.val_dim], dim=2)
        q, k = q.transpose(-2, -1), k.transpose(-2, -1)  # (B, heads, tokens, key_dim)
    else:
        B, N, _ = x.shape
        if downsample:
            k = module.kv(x).view(B, N, module.num_heads, -1)[..., :module.key_dim].permute(0, 2, 1, 3)
            q = module.q(x).view(B, -1, module.num_heads, module.key_dim).permute(0, 2, 1, 3)
        else:
            q, k, _ = module.qkv(x).view(B, N, module.num_heads, -1).split(
                [module.key_dim, module.key_dim, module.val_dim], dim=3)
            q, k = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3)
    logits = (q @ k.transpose(-2, -1)) * module.scale + module.attention_biases[:, module.attention_bias_idxs]
    return logits.double().softmax(dim=-1)


def hieradet_softmax(module, x: torch.Tensor) -> torch.Tensor:
    """HieraDet's MultiScaleAttention (no query pooling): softmax(q k^T scale), written out."""
    B, H, W, _ = x.shape
    q, k, _ = module.qkv(x).reshape(B, H * W, 3, module.num_heads, -1).unbind(2)
    logits = (q.transpose(1, 2) * module.scale) @ k.transpose(1, 2).transpose(-2, -1)
    return logits.double().softmax(dim=-1)


def grid_centres(rows: int, cols: int, spacing: float) -> torch.Tensor:
    i, j = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                          indexing="ij")
    return (torch.stack([i.reshape(-1), j.reshape(-1)], dim=1) + 0.5) * spacing


def row_metrics(attention: torch.Tensor, distances: torch.Tensor | None, prefix: int) -> dict[str, torch.Tensor]:
    """Per (batch row, head, query): the attended distance over the grid keys renormalised, the
    prefix share, the normalised entropy (docs/probes.md)."""
    grid = attention[..., prefix:]
    renormalised = grid / grid.sum(dim=-1, keepdim=True)
    keys = grid.shape[-1]
    entropy = -(renormalised * renormalised.clamp_min(1e-300).log()).sum(dim=-1) / math.log(keys)
    out = {"prefix_share": attention[..., :prefix].sum(dim=-1), "entropy_norm": entropy}
    if distances is not None:
        out["mean_distance_px"] = (renormalised * distances).sum(dim=-1)
    return out


def per_image_means(metrics: dict[str, torch.Tensor], images: torch.Tensor, n_images: int) -> dict[str, np.ndarray]:
    """Means over each image's query rows (batch rows r of image images[r]), then over images,
    per head."""
    out = {}
    for key, values in metrics.items():  # (R, heads, queries)
        summed = torch.zeros(n_images, values.shape[1], dtype=torch.float64).index_add_(0, images, values.sum(dim=2))
        rows = torch.full((len(images),), float(values.shape[2]), dtype=torch.float64)
        counts = torch.zeros(n_images, dtype=torch.float64).index_add_(0, images, rows)
        out[key] = (summed / counts[:, None]).mean(dim=0).numpy()
    return out


def reference(model, images: torch.Tensor) -> dict[int, dict[str, np.ndarray]]:
    """{layer index: {metric: per-head values}} from independently materialised attention."""
    from localitylab.models.describe import describe_model

    maps = extracted_maps(model, images)
    inputs: dict[str, tuple] = {}
    hooks = [layer.module.register_forward_pre_hook(lambda m, args, name=layer.name: inputs.__setitem__(name, args))
             for layer in attention_layers(model)]
    hooks += [layer.module.attn.register_forward_pre_hook(  # TinyViT's and HieraDet's attention have no attn_drop
        lambda m, args, name=layer.name: inputs.__setitem__(name + ".attn", args))
        for layer in attention_layers(model) if layer.adapter.name in ("tinyvit-windows", "hieradet-windows")]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    info = describe_model(model)
    side = images.shape[-1]
    n = len(images)
    out = {}
    for layer in attention_layers(model):
        kind = layer.adapter.name
        args = inputs[layer.name]
        x = args[0]
        heads = layer.num_heads
        if kind == "cait-talking-heads":
            with torch.no_grad():
                attention = talking_heads_softmax(layer.module, x)
        elif kind == "tinyvit-windows":
            with torch.no_grad():
                attention = tiny_vit_softmax(layer.module.attn, inputs[layer.name + ".attn"][0])
        elif kind == "hieradet-windows":
            with torch.no_grad():
                attention = hieradet_softmax(layer.module.attn, inputs[layer.name + ".attn"][0])
        elif kind in ("levit-attention", "levit-downsample"):
            with torch.no_grad():
                attention = levit_softmax(layer.module, x)
        elif kind == "nest-blocks":  # (B, heads, blocks, N, N): the blocks into the batch, image-major
            attention = maps[f"{layer.name}.attn_drop"].transpose(1, 2)
        elif kind in WINDOW_BLOCKS:
            attention = maps[f"{layer.name}.attn.attn_drop"]
        else:
            attention = maps[f"{layer.name}.attn_drop"]
        attention = attention.reshape(-1, heads, *attention.shape[-2:])  # SAM folds heads, Twins windows, in the batch
        batch = torch.arange(attention.shape[0]) // (attention.shape[0] // n)
        if kind == "class-attention":
            metrics = row_metrics(attention, None, attention.shape[-1] - info.grid[0] * info.grid[1])
        elif kind in WINDOW_BLOCKS:
            block = layer.module
            height, width = x.shape[1:3]
            if kind == "sam-windows" and block.window_size == 0:
                window = (height, width)
            elif kind == "hieradet-windows" and not any(block.window_size):
                window = (height, width)
            elif kind == "tinyvit-windows" and height == block.window_size:
                window = (height, width)
            else:
                window = tuple(block.window_size) if isinstance(block.window_size, tuple) else (block.window_size,) * 2
            shift = tuple(block.shift_size) if hasattr(block, "shift_size") else (0, 0)
            metrics = row_metrics(attention, window_distances(height, width, window, shift, side, n), 0)
        elif kind == "twins-local-windows":
            size = layer.module.ws
            metrics = row_metrics(attention, window_distances(*args[1], (size, size), (0, 0), side, n), 0)
        elif kind in ("pvt-spatial-reduction", "twins-global-subsampled"):
            metrics = row_metrics(attention, reduced_distances(layer.module, tuple(args[1]), side), 0)
        elif kind in ("levit-attention", "levit-downsample"):
            height, width = layer.module.resolution
            keys = grid_centres(height, width, side / height)
            stride = getattr(layer.module, "stride", 1)  # down-sampling: the queries are every stride-th token
            queries = keys.view(height, width, 2)[::stride, ::stride].reshape(-1, 2)
            metrics = row_metrics(attention, torch.cdist(queries, keys), 0)
        elif kind == "volo-attention":
            height, width = x.shape[1:3]
            centres = grid_centres(height, width, side / height)
            metrics = row_metrics(attention, torch.cdist(centres, centres), 0)
        elif kind == "nest-blocks":  # T blocks of N tokens, blocks row-major over the level's grid
            blocks, tokens = x.shape[1:3]
            size, level = math.isqrt(tokens), math.isqrt(tokens) * math.isqrt(blocks)
            metrics = row_metrics(attention, window_distances(level, level, (size, size), (0, 0), side, n), 0)
        elif kind == "tnt-attention" and layer.name.endswith("attn_in"):  # the fine grid, one window per patch
            embed = model.pixel_embed
            patches = (embed.img_size[0] // embed.patch_size[0], embed.img_size[1] // embed.patch_size[1])
            window = tuple(embed.new_patch_size)
            fine = (patches[0] * window[0], patches[1] * window[1])
            metrics = row_metrics(attention, window_distances(*fine, window, (0, 0), side, n), 0)
        else:
            if kind == "crossvit-branch":  # branch b: the image resized to its own size, cut in its patches
                embed = model.patch_embed[int(layer.name.split(".")[3])]
                grid = (embed.img_size[0] // embed.patch_size[0], embed.img_size[1] // embed.patch_size[1])
            elif kind == "tnt-attention":  # outer attention: the class token and the patches
                embed = model.pixel_embed
                grid = (embed.img_size[0] // embed.patch_size[0], embed.img_size[1] // embed.patch_size[1])
            elif kind == "pit-stages":  # the class token(s), then a square stage grid
                stage = math.isqrt(attention.shape[-1] - model.cls_token.shape[1])
                grid = (stage, stage)
            else:
                grid = info.grid_for((side, side))  # NaFlexViT: the image's own grid
            tokens = grid[0] * grid[1]
            prefix = attention.shape[-1] - tokens
            centres = grid_centres(*grid, side / grid[0])
            distances = torch.cdist(centres, centres)
            metrics = row_metrics(attention[:, :, prefix:], distances, prefix)
        out[layer.index] = per_image_means(metrics, batch, n)
    return out


WINDOW_BLOCKS = ("swin-windows", "swin-v2-windows", "swin-v2-cr-windows", "sam-windows", "tinyvit-windows",
                 "hieradet-windows")


def window_distances(height: int, width: int, window: tuple[int, int], shift: tuple[int, int], side: int,
                     batch: int) -> torch.Tensor:
    """(batch * windows, 1, N, N) true pixel distances between the tokens of each window:
    window (r, c) of the (cyclically shifted) grid holds the tokens at
    ((r wh + i + s_h) mod H, (c ww + j + s_w) mod W)."""
    (wh, ww), (sh, sw) = window, shift
    spacing = side / height
    rows, cols = math.ceil(height / wh), math.ceil(width / ww)
    local = grid_centres(wh, ww, 1.0) - 0.5  # integer offsets inside a window
    windows = []
    for r in range(rows):
        for c in range(cols):
            true = torch.stack([(r * wh + local[:, 0] + sh) % height, (c * ww + local[:, 1] + sw) % width], dim=1)
            centres = (true + 0.5) * spacing
            windows.append(torch.cdist(centres, centres))
    return torch.stack(windows).repeat(batch, 1, 1).unsqueeze(1)  # image-major, like the window partitions


def reduced_distances(module, size: tuple[int, int], side: int) -> torch.Tensor:
    """Queries on the stage grid; keys at the centres of the cells the reduction averages."""
    height, width = size
    spacing = side / height
    queries = grid_centres(height, width, spacing)
    if getattr(module, "pool", None) is not None:
        count = module.pool.output_size
        count = count if isinstance(count, int) else count[0]
        bins = torch.tensor([(math.floor(i * height / count) + math.ceil((i + 1) * height / count)) / 2 * spacing
                             for i in range(count)], dtype=torch.float64)
        keys = torch.stack(torch.meshgrid(bins, bins, indexing="ij"), dim=-1).reshape(-1, 2)
    elif module.sr is not None:
        ratio = module.sr.stride[0]
        keys = grid_centres(height // ratio, width // ratio, spacing * ratio)
    else:
        keys = queries
    return torch.cdist(queries, keys)


def probe_table(model, images: torch.Tensor):
    return localitylab.probe("attention-distance", model, images, preprocessing="prepared", batch_size=2,
                             options={"query_block": 7})


def check_against_reference(model, images: torch.Tensor) -> set[int]:
    table = probe_table(model, images)
    ours = table[table["head"].notna()].set_index(["metric", "layer", "head"])["value"]
    expected = reference(model, images)
    errors = []
    for layer, metrics in expected.items():
        for metric, values in metrics.items():
            for head, value in enumerate(values):
                got = ours[(metric, layer, head)]
                if math.isnan(value):  # one key (a 1 x 1 stage grid): no normalised entropy, on both sides
                    assert math.isnan(got), (metric, layer, head, got)
                    continue
                relative = metric == "mean_distance_px" and value != 0  # (there too, distance 0)
                errors.append((abs(got - value) / (abs(value) if relative else 1.0), metric, layer))
    assert not any(math.isnan(error) for error, _, _ in errors), [e for e in errors if math.isnan(e[0])]
    worst = max(errors)
    assert worst[0] < TOLERANCE, worst
    return set(expected)


def check_outputs_unchanged(model, images: torch.Tensor) -> None:
    with torch.no_grad():
        before = model(images)
        layers = attention_layers(model)
        with read_attention(layers, lambda block: None, memory_target(model, images, "prepared").geometry):
            during = model(images)
        after = model(images)
    assert float((during - before).norm() / before.norm()) < TOLERANCE  # float rounding (worst seen: 1.7e-6)
    assert torch.equal(after, before)


FLAT = {"depth": 2, "embed_dim": 64, "num_heads": 2}
ANY_SIZE = ("pvt", "naflex", "tiny_vit", "hieradet")
CASES = {
    # name: (timm model, kwargs, image sides: two sequence lengths; ANY_SIZE models take any size unasked)
    "eva-rotary+cls+reg": ("eva02_tiny_patch14_224", {**FLAT, "patch_size": 8, "num_reg_tokens": 2}, (32, 48)),
    "eva-rotary-noprefix": ("eva02_tiny_patch14_224", {**FLAT, "patch_size": 8, "class_token": False,
                                                        "global_pool": "avg"}, (32, 48)),
    "beit-relative-bias": ("beit_base_patch16_224", {**FLAT, "patch_size": 8}, (32, 48)),
    "relpos+cls": ("vit_relpos_base_patch16_cls_224", {**FLAT, "patch_size": 8}, (32, 48)),
    "relpos-noprefix": ("vit_relpos_small_patch16_224", {**FLAT, "patch_size": 8}, (32, 48)),
    "convit-gpsa+mhsa": ("convit_tiny", {"depth": 2, "embed_dim": 64, "num_heads": 4, "local_up_to_layer": 1,
                                         "patch_size": 8}, (32, 48)),
    "cait-talking-heads+class": ("cait_xxs24_224", {**FLAT, "depth_token_only": 1, "patch_size": 8}, (32, 48)),
    "swin-v1": ("swin_tiny_patch4_window7_224", {"embed_dim": 32, "depths": (2, 2), "num_heads": (2, 2),
                                                 "window_size": 4}, (64, 96)),
    "swin-v2": ("swinv2_tiny_window8_256", {"embed_dim": 32, "depths": (2, 2), "num_heads": (2, 2), "window_size": 4,
                                            "pretrained_window_sizes": (0, 0)}, (64, 96)),
    "tiny-vit": ("tiny_vit_5m_224", {"depths": (1, 1, 1, 1), "embed_dims": (16, 32, 64, 64),
                                     "num_heads": (1, 2, 2, 2), "window_sizes": (4, 4, 4, 2)}, (64, 128)),
    "sam-windows+global": ("samvit_base_patch16_224", {**FLAT, "patch_size": 8, "window_size": 2,
                                                       "global_attn_indexes": (1,)}, (32, 48)),
    "twins-svt": ("twins_svt_small", {"depths": (2, 2, 1, 1), "embed_dims": (16, 32, 64, 128),
                                      "num_heads": (1, 2, 4, 8), "wss": (4, 4, 2, 2)}, (64, 128)),
    "twins-pcpvt": ("twins_pcpvt_small", {"depths": (1, 1, 1, 1), "embed_dims": (16, 32, 64, 128),
                                          "num_heads": (1, 2, 4, 8)}, (64, 96)),
    "deepseek-rope": ("deepseek_vit_412m", FLAT, (56, 84)),
    "qwen3-rope": ("qwen3_vit_88m", FLAT, (64, 96)),
    "gemma4-rope": ("gemma4_vit_167m", FLAT, (64, 96)),
    "naflexvit": ("naflexvit_base_patch16_gap", {**FLAT, "patch_size": 8}, (32, 48)),
    "pvt-v2-sr": ("pvt_v2_b0", {"depths": (1, 1, 1, 1), "embed_dims": (16, 32, 64, 128),
                                "num_heads": (1, 2, 4, 8)}, (64, 96)),
    "pvt-v2-linear": ("pvt_v2_b2_li", {"depths": (1, 1, 1, 1), "embed_dims": (16, 32, 64, 128),
                                       "num_heads": (1, 2, 4, 8)}, (64, 96)),
    "parallel-block+cls": ("vit_base_patch16_xp_224", {**FLAT, "patch_size": 8}, (32, 48)),
    "parallel-block+reg": ("vit_pwee_patch16_reg1_gap_256", {**FLAT, "patch_size": 8}, (32, 48)),
    "parallel-block-noprefix": ("vit_base_patch16_xp_224", {**FLAT, "patch_size": 8, "class_token": False,
                                                            "global_pool": "avg"}, (32, 48)),
    "pit-stages+cls": ("pit_ti_224", {"depth": (1, 1, 1)}, (64, 96)),
    "pit-stages+cls+dist": ("pit_ti_distilled_224", {"depth": (1, 1, 1)}, (64, 96)),
    "levit-tokens": ("levit_128s", {"depth": (1, 1, 1)}, (64, 128)),
    "levit-feature-maps": ("levit_conv_128s", {"depth": (1, 1, 1)}, (64, 128)),
    "volo": ("timm.models.volo.VOLO", {"layers": (1, 1, 1, 1), "embed_dims": (32, 64, 64, 64), "num_heads": (1, 2, 2, 2)},
             (64, 96)),
    "tnt-outer+cls-inner": ("tnt_s_patch16_224", {"depth": 2, "embed_dim": 64, "inner_dim": 16, "num_heads_outer": 2,
                                                  "num_heads_inner": 2}, (64, 96)),
    "tnt-legacy": ("tnt_s_legacy_patch16_224", {"depth": 1, "embed_dim": 64, "inner_dim": 16, "num_heads_outer": 2,
                                                "num_heads_inner": 2}, (64, 96)),
    "nest-blocks": ("timm.models.nest.Nest", {"depths": (1, 1, 1), "embed_dims": (32, 64, 128), "num_heads": (1, 2, 4)},
                    (64, 128)),
    "hieradet-windows+global": ("hieradet_small", {"embed_dim": 16, "num_heads": 1, "stages": (1, 2, 1, 1),
                                                   "global_att_blocks": (2,), "window_spec": (4, 4, 2, 2),
                                                   "num_classes": 0},  # (its head starts at zero: features out)
                                (64, 128)),
    "swin-v2-cr": ("swinv2_cr_tiny_224", {"embed_dim": 32, "depths": (2, 2), "num_heads": (2, 2), "window_size": 4},
                   (64, 96)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_equals_independent_materialisation(case):
    name, kwargs, sides = CASES[case]
    for side in sides:
        model = build(name, **kwargs) if name.startswith(ANY_SIZE) else build(name, img_size=side, **kwargs)
        images = torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(side))
        layers = check_against_reference(model, images)
        assert layers == {layer.index for layer in attention_layers(model)}
        check_outputs_unchanged(model, images)


def test_swin_reads_shifted_and_plain_windows():
    """Block 0 of each stage attends in plain windows, block 1 in shifted ones: both are read
    and said so, and the shifted windows' masked pairs carry no weight."""
    name, kwargs, _ = CASES["swin-v1"]
    model = build(name, img_size=64, **kwargs)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    table = probe_table(model, images)
    notes = table[(table["metric"] == "mean_distance_px") & table["head"].isna()].set_index("layer")["note"]
    assert notes[0] == "windows of 4x4 tokens" and notes[1] == "windows of 4x4 tokens, shifted by 2,2"
    assert notes[2] == "windows of 4x4 tokens" and notes[3] == "windows of 4x4 tokens, shifted by 2,2"  # stage 2
    uniform = table[(table["metric"] == "uniform_distance_px") & table["head"].isna()].set_index("layer")["value"]
    # the uniform reference on each stage's own grid: 16 x 16 tokens 4 px apart, then 8 x 8 tokens 8 px apart
    assert uniform[0] == uniform[1] == TokenGeometry((16, 16), 4, 0).uniform_distance_px()
    assert uniform[2] == uniform[3] == TokenGeometry((8, 8), 8, 0).uniform_distance_px()


def test_pe_similarity_on_a_transformer_without_one_grid_says_so_not_convnet():
    """Swin's tokens change grid from stage to stage: pe-similarity does not apply, and the
    reason names the tokens, not a ConvNet (the wording a resnet gets)."""
    name, kwargs, _ = CASES["swin-v1"]
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    swin = localitylab.probe("pe-similarity", build(name, img_size=64, **kwargs), images, preprocessing="prepared")
    note = swin["note"].iloc[0]
    assert "does not apply" in note and "not one fixed grid" in note and "ConvNet" not in note
    resnet = localitylab.probe("pe-similarity", build("resnet18"), images, preprocessing="prepared")
    assert "(a ConvNet or another kind of mixing)" in resnet["note"].iloc[0]
    # MViTv2's tokens change grid by stage too
    mvit = localitylab.probe("pe-similarity", build("mvitv2_tiny", img_size=64), images, preprocessing="prepared")
    note = mvit["note"].iloc[0]
    assert "not one fixed grid" in note and "ConvNet" not in note
    # LeViT: attention (with biases) in stages of its own, no patch_embed grid; not a ConvNet either
    levit = localitylab.probe("pe-similarity", build("levit_128s", img_size=64), images, preprocessing="prepared")
    note = levit["note"].iloc[0]
    assert "has attention but no patch_embed token grid" in note and "ConvNet" not in note


def test_mixed_attention_classes_keep_the_block_index():
    """XCiT: channel attention (not read, one row saying why) in blocks 0-1, class attention in
    block 2; ConViT: GPSA then plain self-attention; CaiT: talking heads then class attention."""
    xcit = build("xcit_nano_12_p8_224", depth=2, embed_dim=64, num_heads=2, cls_attn_layers=1, img_size=32)
    assert [(layer.index, layer.adapter.name) for layer in attention_layers(xcit)] == [(2, "class-attention")]
    assert [(layer.index, layer.class_name) for layer in unread_attention_layers(xcit)] == [(0, "XCA"), (1, "XCA")]
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    table = probe_table(xcit, images)
    unread = table[(table["layer"] < 2)]
    assert list(unread["note"]) == ["XCA is not read: cross-covariance attention: a softmax over channels, not "
                                    "between tokens"] * 2 and unread["value"].isna().all()
    cls = table[table["layer"] == 2].set_index(["metric", "head"])
    assert np.isnan(cls.loc[("mean_distance_px", 0), "value"]) and "no position" in cls.loc[("mean_distance_px", 0), "note"]
    assert 0 < cls.loc[("entropy_norm", 0), "value"] <= 1
    convit = build("convit_tiny", depth=3, embed_dim=64, num_heads=4, local_up_to_layer=2, patch_size=8, img_size=32)
    assert [(layer.index, layer.adapter.name) for layer in attention_layers(convit)] == [
        (0, "convit-gpsa"), (1, "convit-gpsa"), (2, "convit-mhsa")]
    cait = build("cait_xxs24_224", depth=2, depth_token_only=2, embed_dim=64, num_heads=2, patch_size=8, img_size=32)
    assert [(layer.index, layer.adapter.name) for layer in attention_layers(cait)] == [
        (0, "cait-talking-heads"), (1, "cait-talking-heads"), (2, "class-attention"), (3, "class-attention")]


def test_crossvit_branches_sit_on_their_own_grids():
    """CrossViT's two branches (12 px patches of the 240 px image: 401 tokens; 16 px patches of
    it resized to 224: 197 tokens, 240 / 14 px apart) against timm's own maps; the fusion
    layers' cross-attention is named, not read."""
    model = build("crossvit_tiny_240", depth=[[1, 1, 0]], embed_dim=[32, 64], num_heads=[2, 2])
    images = torch.randn(2, 3, 240, 240, generator=torch.Generator().manual_seed(3))
    layers = attention_layers(model)
    assert [layer.adapter.name for layer in layers] == ["crossvit-branch"] * 2
    assert {layer.adapter.grid for layer in layers} == {(20, 20), (14, 14)}
    assert check_against_reference(model, images) == {layer.index for layer in layers}
    assert {layer.class_name for layer in unread_attention_layers(model)} == {"CrossAttention"}
    check_outputs_unchanged(model, images)


def test_an_adapter_refuses_a_timm_whose_copied_forward_changed(monkeypatch):
    """ConViT's plain layers are read through a copy of timm's MHSA.forward. A timm whose
    MHSA.forward differs (here the class's own function replaced, no subclass: what an
    upgrade looks like) is refused: those layers are named as not read with the one-line
    reason, no number; the GPSA layers, whose copy still matches, are read as before."""
    import timm
    from timm.models.convit import MHSA

    from localitylab.attention.families import TIMM_WRITTEN_FOR

    original = MHSA.forward

    def forward(self, x):  # the same computation, from another source
        return original(self, x) + 0.0

    monkeypatch.setattr(MHSA, "forward", forward)
    convit = build("convit_tiny", depth=3, embed_dim=64, num_heads=4, local_up_to_layer=2, patch_size=8, img_size=32)
    reason = f"timm {timm.__version__} changed MHSA.forward; this adapter was written for timm {TIMM_WRITTEN_FOR}"
    assert [(layer.index, layer.adapter.name) for layer in attention_layers(convit)] == [
        (0, "convit-gpsa"), (1, "convit-gpsa")]
    assert [(layer.index, layer.why) for layer in unread_attention_layers(convit)] == [(2, reason)]
    table = probe_table(convit, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)))
    refused = table[table["layer"] == 2]
    assert list(refused["note"]) == [f"MHSA is not read: {reason}"] and refused["value"].isna().all()
    assert table[table["layer"] < 2]["value"].notna().any()


def test_fingerprints_see_code_not_comments_or_layout():
    """A copied forward's fingerprint ignores its docstring, comments and line breaks (timm
    reformatting is no change) and sees any change to what the code computes."""
    from localitylab.attention.adapters import source_fingerprint

    def first(self, x):
        """Docstring."""
        return self.proj(x) * 2  # a comment

    def second(self, x):
        # another comment
        return self.proj(
            x) * 2

    def third(self, x):
        return self.proj(x) * 3

    assert source_fingerprint(first) == source_fingerprint(second) != source_fingerprint(third)

"""The permutation probe's equivariance certificate (docs/probes.md, permutation): permute the
model's input pixels by pi and its position-embedding rows by the same pi (in a copy of the
model; [cls] and register rows untouched), and compare its logits with the untouched model
on the untouched input. A PiT agrees to float rounding for any pi, a ViT only when pi moves
whole patches; a ConvNet has no embedding to permute, and its row is the error of permuting
the input alone (not a certificate).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from localitylab.data.permutation import global_permutation, permute_pixels, setting_seed, tile_permutation
from localitylab.probes.base import Measurements, ProbeInputs


def permuted_position_copy(model: nn.Module, token_permutation: torch.Tensor) -> nn.Module:
    """A copy of a timm ViT whose position-embedding row t is the original row token_permutation[t]."""
    twin = copy.deepcopy(model)
    prefix = 0 if getattr(twin, "no_embed_class", False) else int(getattr(twin, "num_prefix_tokens", 0))
    with torch.no_grad():
        rows = twin.pos_embed[:, prefix:]
        twin.pos_embed[:, prefix:] = rows[:, token_permutation.to(rows.device)]
    return twin


# Module classes and attributes that carry position outside the absolute table.
POSITION_MARKERS = {
    "rotary position embedding": ("rope", "rotary", "rot_pos"),
    "relative position bias": ("relative_position", "rel_pos", "relpos"),
    "window attention": ("window",),
    "gated positional self-attention": ("gpsa", "rel_indices"),
}


def position_outside_table(model: nn.Module) -> str | None:
    """Why a permutation of the embedding rows cannot move all of `model`'s position
    information, or None when the absolute table holds all of it (a plain ViT)."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "backbone", None) is not None:
        return "a convolutional stem (hybrid ViT) sees pixel positions before the embedding"
    for name, module in model.named_modules():
        words = (type(module).__name__.lower(), *(attr.lower() for attr in vars(module)),
                 *(n.lower() for n, _ in module.named_parameters(recurse=False)),
                 *(n.lower() for n, _ in module.named_buffers(recurse=False)))
        for what, markers in POSITION_MARKERS.items():
            if any(marker in word for marker in markers for word in words) and not _unused(module, markers):
                return f"{what} ({type(module).__name__} at {name or 'the model'}) is not in the permuted table"
        if isinstance(module, nn.Conv2d) and module is not getattr(patch_embed, "proj", None):
            return f"a convolution over the token grid ({name}) sees neighbouring tokens"
        if isinstance(module, nn.Conv2d) and (tuple(module.kernel_size) != tuple(module.stride) or
                                              any(p != 0 for p in _pair(module.padding))):
            return f"the patch embedding ({name}) overlaps or pads, so it sees pixel positions"
    return None


def _unused(module: nn.Module, markers: tuple[str, ...]) -> bool:
    """Attributes such as `rope = None` name a feature the module does not use."""
    for attr, value in vars(module).items():
        if any(marker in attr.lower() for marker in markers) and value is None:
            return True
    return False


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def permutable_embedding(model: nn.Module) -> tuple[int, int, int] | None:
    """(patch size, grid rows, grid cols) when the model has one absolute embedding row per
    token that a permutation can move, else None."""
    from localitylab.models.describe import describe_model

    pos_embed = getattr(model, "pos_embed", None)
    if not isinstance(pos_embed, torch.Tensor) or getattr(model, "dynamic_img_size", False):
        return None
    info = describe_model(model)  # the token spacing (a hybrid's is its backbone's stride), decided there
    if info.grid is None or not isinstance(info.patch_size, int):
        return None
    (grid_h, grid_w), patch = info.grid, info.patch_size
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 0))
    if pos_embed.ndim != 3 or pos_embed.shape[1] != prefix + grid_h * grid_w:
        return None
    return patch, grid_h, grid_w


@torch.no_grad()
def logit_difference(reference: nn.Module, candidate: nn.Module, inputs: ProbeInputs,
                     permutation: torch.Tensor, cache: dict | None = None) -> tuple[float, float]:
    """(max |candidate(permute(x)) - reference(x)|, relative Frobenius error) over the probe's
    prepared images x (the base's batches). `cache` keeps reference(x) per batch, so several
    certificates against one reference run it once."""
    max_abs, diff_sq, ref_sq = 0.0, 0.0, 0.0
    permutation = permutation.to(inputs.target.device)
    cache = {} if cache is None else cache
    for index, batch in enumerate(inputs.batches()):
        if index not in cache:
            cache[index] = reference(batch.inputs).double()
        expected = cache[index]
        got = candidate(permute_pixels(batch.inputs, permutation)).double()
        max_abs = max(max_abs, float((got - expected).abs().max()))
        diff_sq += float(((got - expected) ** 2).sum())
        ref_sq += float((expected**2).sum())
    return max_abs, math.sqrt(diff_sq) / max(math.sqrt(ref_sq), 1e-30)


def equivariance_rows(inputs: ProbeInputs, out: Measurements, expected: dict | None = None) -> None:
    """The certificate rows; pi acts on the model's input (after any training permutation).
    `expected`: the untouched model's logits per batch where they were already computed (the
    permutation probe's clean pass)."""
    target = inputs.target
    model = target.model
    height, width = target.prepare(inputs.images[:1]).shape[-2:]

    expected = {} if expected is None else expected  # the untouched model's logits, shared by every certificate
    compared: dict = {}  # (candidate, pi) -> its errors: a ViT's pixel certificate and input-only are one comparison

    def add(setting: str, permutation: torch.Tensor, candidate: nn.Module, note: str) -> None:
        key = (id(candidate), id(permutation))
        if key not in compared:  # the pair is kept alive with its errors, so no later object takes its ids
            compared[key] = candidate, permutation, logit_difference(model, candidate, inputs, permutation, expected)
        max_abs, rel = compared[key][2]
        out.single("equivariance_max_abs", max_abs, setting=setting, note=note, n_images=inputs.n_images)
        out.single("equivariance_rel", rel, setting=setting, note=note, n_images=inputs.n_images)

    pixel_seed = setting_seed(inputs.seed, "equivariance-pixel")
    pixel_pi = global_permutation(height, width, pixel_seed)
    embedding = permutable_embedding(model)
    refusal = position_outside_table(model) if getattr(model, "patch_embed", None) is not None else None
    if refusal is not None:
        for metric in ("equivariance_max_abs", "equivariance_rel"):
            out.single(metric, None, setting="equivariance", n_images=0,
                       note=f"no certificate: {refusal}, so permuting the embedding rows cannot test equivariance")
    elif embedding is not None:
        patch, grid_h, grid_w = embedding
        if patch == 1:
            add("equivariance-pixel", pixel_pi, permuted_position_copy(model, pixel_pi),
                f"random pixel pi (seed={pixel_seed}), position-embedding rows permuted by the same pi")
        else:
            patch_seed = setting_seed(inputs.seed, "equivariance-patch")
            order = torch.randperm(grid_h * grid_w, generator=torch.Generator().manual_seed(patch_seed))
            add("equivariance-patch", tile_permutation(height, width, patch, patch, order),
                permuted_position_copy(model, order),
                f"pi moves whole {patch}x{patch} patches (seed={patch_seed}), embedding rows permuted alike")
            add("equivariance-pixel", pixel_pi, model,
                f"random pixel pi (seed={pixel_seed}) inside patches: no row permutation of a patch-{patch} "
                "embedding matches it, rows untouched; the error shows equivariance does not hold")
    note = (f"input pixels permuted alone (seed={pixel_seed}): "
            + ("no absolute position embedding to permute, so this is not a certificate"
               if embedding is None else "the position embedding is what tells pixels apart"))
    add("input-only", pixel_pi, model, note)

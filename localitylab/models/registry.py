"""One registry for every model localitylab can build.

A registry entry is a function `(spec: ModelSpec) -> nn.Module`. Names are what users type:
`pit-t`, `vit-s/4` (family `vit-s` with patch size 4), `resnet-18`, or `timm:NAME` for any
timm model. The spec records everything needed to rebuild the same architecture from a
checkpoint, so a checkpoint never stores code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

from localitylab.errors import UserError
from localitylab.models.spec import POS_EMBED_KINDS, POS_EMBEDS, ModelSpec, split_model_name
from localitylab.models.timm_adapter import build_timm_model

__all__ = ["POS_EMBEDS", "ModelEntry", "ModelSpec", "build_model", "default_pos_embed", "is_model_name", "looks_like_path", "model_entries", "model_kind", "parse_model_name",
           "register_model", "spec_for_data", "valid_names_hint"]


@dataclass(frozen=True)
class ModelEntry:
    name: str  # family name, e.g. 'pit-t' or 'vit-t' (the latter takes '/P')
    builder: Callable[[ModelSpec], nn.Module]
    kind: str  # 'pit' | 'vit' | 'convnet' | 'dit'
    summary: str
    takes_patch: bool = False
    example_patch: int | None = None  # for listings: the patch size shown in the zoo
    pos_embed: str | None = None  # the family's default position embedding; None: it takes none


_MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, kind: str, summary: str, takes_patch: bool = False, example_patch: int | None = None,
                   pos_embed: str | None = None):
    """Decorator: add a builder to the registry under `name` (`pos_embed`: the default
    position embedding of a family that takes pos_embed)."""

    def wrap(builder: Callable[[ModelSpec], nn.Module]) -> Callable[[ModelSpec], nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = ModelEntry(name, builder, kind, summary, takes_patch, example_patch, pos_embed)
        return builder

    return wrap


def default_pos_embed(name: str) -> str | None:
    """The position embedding a registry model gets without `pos_embed` ('learn' for PiTs and
    ViTs, 'sincos' for DiTs); None for a model that takes none (ConvNets, timm:)."""
    family, _ = parse_model_name(name)
    entry = _MODELS.get(family)
    return entry.pos_embed if entry is not None else None


def model_entries() -> list[ModelEntry]:
    return list(_MODELS.values())


def valid_names_hint() -> str:
    names = [f"{e.name}/P" if e.takes_patch else e.name for e in _MODELS.values()]
    return ", ".join(names) + ", timm:NAME"


def parse_model_name(name: str) -> tuple[str, int | None]:
    """'vit-t/2' -> ('vit-t', 2); 'pit-t' -> ('pit-t', None); 'timm:x' -> ('timm:x', None)."""
    if name.startswith("timm:"):
        if len(name) == len("timm:"):
            raise UserError("timm: needs a model name, e.g. timm:vit_small_patch16_224")
        return name, None
    family, patch = split_model_name(name)
    entry = _MODELS.get(family)
    if entry is None:
        if looks_like_path(name):
            raise UserError(f"{name}: no such file or folder (it looks like a path to a checkpoint or a run "
                            f"folder, not a model name)")
        raise UserError(f"unknown model {name!r}{_did_you_mean(family, [e.name for e in _MODELS.values()])}; "
                        f"valid: {valid_names_hint()}")
    if entry.takes_patch and patch is None:
        raise UserError(f"model {name!r} needs a patch size, e.g. {family}/2")
    if not entry.takes_patch and patch is not None:
        raise UserError(f"model {family!r} takes no patch size; valid: {valid_names_hint()}")
    if patch is not None and patch < 1:
        raise UserError(f"patch size must be at least 1, got {patch}")
    return family, patch


def looks_like_path(name: str) -> bool:
    """Whether `name`, not a model name, was meant as a path: a '/' that is not a patch size
    (`runs/pit-n-digits`), a `.pt`/`.safetensors` file, or a path start ('.', '~')."""
    family, _ = split_model_name(name)
    return ("/" in family or name.endswith((".pt", ".pth", ".safetensors", ".json")) or name.startswith((".", "~"))
            or "\\" in name)


def _did_you_mean(name: str, names: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def is_model_name(name: str) -> bool:
    """Whether the registry builds `name` (a model in memory is named by its class: not one it builds)."""
    try:
        parse_model_name(name)
    except UserError:
        return False
    return True


def model_kind(name: str) -> str:
    family, _ = parse_model_name(name)
    if family.startswith("timm:"):
        return "timm"
    return _MODELS[family].kind


# Shapes a registry model takes from its data set (and its name), never from model_kw: a
# model built for other shapes than its data would fail only in the middle of training.
SHAPE_KEYS = ("img_size", "in_chans", "num_classes", "patch_size")


def spec_for_data(model: str, img_size: int, in_chans: int, num_classes: int, pos_embed: str | None = "learn",
                  model_kw: dict[str, Any] | None = None, drop_path: float = 0.0,
                  pos_embed_std: float | None = None) -> ModelSpec:
    """The spec of registry model `model` for images of a data set's shapes.

    Registry models take their shapes from the data (and the patch size from the name);
    a `timm:` model may override them with `model_kw` (img_size, in_chans, num_classes).
    `pos_embed` and `pos_embed_std` (the learned table's initial std, where `model_kw` does
    not set it) apply to PiTs, ViTs and DiTs only; `drop_path` > 0 becomes `drop_path_rate`.
    """
    kind = model_kind(model)
    model_kw = dict(model_kw or {})
    if drop_path > 0:
        model_kw.setdefault("drop_path_rate", drop_path)
    if kind == "timm":
        img_size = int(model_kw.pop("img_size", img_size))
        in_chans = int(model_kw.pop("in_chans", in_chans))
        num_classes = int(model_kw.pop("num_classes", num_classes))
        return ModelSpec(model, img_size, in_chans, num_classes, None, model_kw)
    if kind not in POS_EMBED_KINDS:
        return ModelSpec(model, img_size, in_chans, num_classes, None, model_kw)
    if pos_embed_std is not None and pos_embed == "learn":
        model_kw.setdefault("pos_embed_std", pos_embed_std)
    return ModelSpec(model, img_size, in_chans, num_classes, pos_embed, model_kw)


def build_model(spec: ModelSpec) -> nn.Module:
    """Build an untrained model for `spec`. Raises UserError for impossible specs."""
    for label, value in (("image size", spec.img_size), ("channels", spec.in_chans), ("classes", spec.num_classes)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{label} must be a positive integer, got {value!r}")
    family, _ = parse_model_name(spec.name)
    if family.startswith("timm:"):
        return build_timm_model(spec)
    fixed = [key for key in SHAPE_KEYS if key in spec.model_kw]
    if fixed:
        raise UserError(f"{spec.name}: model_kw {fixed[0]} cannot be set; image size, channels and classes come "
                        f"from the data set and the patch size from the name (e.g. vit-n/4)", setting="model_kw")
    return _MODELS[family].builder(spec)


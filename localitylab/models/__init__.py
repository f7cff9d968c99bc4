"""Models: one registry (`pit-*`, `vit-*/P`, `resnet-*`, `timm:NAME`) and a uniform description."""

from localitylab.models.describe import ModelInfo, describe_model
from localitylab.models.registry import (
    POS_EMBEDS,
    ModelSpec,
    build_model,
    default_pos_embed,
    model_entries,
    model_kind,
    parse_model_name,
    register_model,
    spec_for_data,
)

__all__ = [
    "POS_EMBEDS",
    "ModelInfo",
    "ModelSpec",
    "build_model",
    "default_pos_embed",
    "describe_model",
    "model_entries",
    "model_kind",
    "parse_model_name",
    "register_model",
    "spec_for_data",
]

"""Models: one registry (`pit-*`, `vit-*/P`, `resnet-*`, `dit-*/P`, `timm:NAME`) and a uniform description."""

from localitylab.models.describe import ModelDescription, describe_model
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

# The families register themselves when imported; every import of localitylab.models.*
# runs this file first, so the registry is full before anything looks a name up.
from localitylab.models import resnet, vit, dit  # noqa: E402,F401  isort: skip

__all__ = [
    "POS_EMBEDS",
    "ModelDescription",
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

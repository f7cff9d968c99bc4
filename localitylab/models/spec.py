"""What a model is: its registry name and the shapes it was built for.

The lowest piece of the models part: the registry, the model families and the timm adapter
all read a `ModelSpec`, and this module imports none of them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

POS_EMBEDS = ("learn", "sincos", "none")
POS_EMBED_KINDS = ("pit", "vit", "dit")  # the model kinds that take pos_embed

_PATCH = re.compile(r"^(?P<family>[a-z0-9-]+)/(?P<patch>\d+)$")


def split_model_name(name: str) -> tuple[str, int | None]:
    """'vit-t/2' -> ('vit-t', 2); 'pit-t' -> ('pit-t', None): the name's parts, unchecked
    (`registry.parse_model_name` checks them against the registry)."""
    match = None if name.startswith("timm:") else _PATCH.match(name)
    return (match["family"], int(match["patch"])) if match else (name, None)


@dataclass(frozen=True)
class ModelSpec:
    """What a model is: the registry name and the shapes it was built for."""

    name: str
    img_size: int
    in_chans: int
    num_classes: int
    pos_embed: str | None = None  # learn | sincos | none, for pit/vit/dit; None elsewhere
    model_kw: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def family(self) -> str:
        return split_model_name(self.name)[0]

    @property
    def patch(self) -> int | None:
        """The patch size the name gives ('vit-n/2' -> 2); None for names without one."""
        return split_model_name(self.name)[1]

"""The zoo listing: every registry model described at one image shape."""

from __future__ import annotations

import torch

from localitylab.models.describe import describe_model
from localitylab.models.registry import ModelSpec, build_model, model_entries


def zoo_rows(img_size: int = 32, in_chans: int = 3, num_classes: int = 100) -> list[dict]:
    rows = []
    for entry in model_entries():
        name = f"{entry.name}/{entry.example_patch}" if entry.takes_patch else entry.name
        spec = ModelSpec(name, img_size, in_chans, num_classes, entry.pos_embed)
        # Built on the meta device: shapes and counts without allocating or initialising weights.
        with torch.device("meta"):
            described = describe_model(build_model(spec))
        rows.append({
            "name": name if not entry.takes_patch else f"{entry.name}/P",
            "kind": entry.kind,
            "params": described.params,
            "patch": str(described.patch_size) if described.patch_size else "-",
            "tokens": str(described.tokens_per_image) if described.tokens_per_image else "-",
            "summary": entry.summary + (f" (shown at P={entry.example_patch})" if entry.takes_patch else ""),
        })
    return rows

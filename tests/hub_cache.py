"""A Hugging Face hub cache in the hub's own layout, holding generated weights, for tests of
`--pretrained` with no network: `HF_HOME=<root>` and `HF_HUB_OFFLINE=1` make timm find them
exactly where a real download would have put them.

    <root>/hub/models--timm--<name>/blobs/<sha256>
    <root>/hub/models--timm--<name>/snapshots/<revision>/model.safetensors -> ../../blobs/<sha256>
    <root>/hub/models--timm--<name>/refs/main   (holds <revision>)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

# timm's smallest pretrained ViT: 160 x 160 input, 16 x 16 patches, [cls], mean = std = 0.5,
# bicubic, crop 0.95 (none of them the data set's or ImageNet's defaults).
MODEL = "test_vit.r160_in1k"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def generated_weights(name: str = MODEL, seed: int = 1) -> dict[str, torch.Tensor]:
    """A state dict for timm model `name` that no initialisation would produce: every tensor
    drawn from N(0, 0.05^2) with `seed` (so attention is far from uniform)."""
    import timm

    model = timm.create_model(name, pretrained=False)
    generator = torch.Generator().manual_seed(seed)
    return {key: (torch.randn(value.shape, generator=generator) * 0.05).to(value.dtype).contiguous()
            for key, value in model.state_dict().items()}


def write_hub_cache(root: Path, state: dict[str, torch.Tensor], name: str = MODEL) -> Path:
    """Put `state` in a hub cache under `root` (use as HF_HOME) as timm/<name>'s model.safetensors;
    returns the file in its snapshot."""
    from safetensors.torch import save_file

    repo = Path(root) / "hub" / f"models--timm--{name}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    staging = repo / "staging.safetensors"
    save_file(state, str(staging))
    digest = hashlib.sha256(staging.read_bytes()).hexdigest()
    blob = repo / "blobs" / digest
    staging.replace(blob)
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    link = snapshot / "model.safetensors"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(os.path.relpath(blob, snapshot), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    return link


def write_weights_file(path: Path, name: str = MODEL) -> Path:
    """The generated weights of `name` as a plain .safetensors file (what --weights takes)."""
    from safetensors.torch import save_file

    save_file(generated_weights(name), str(path))
    return path

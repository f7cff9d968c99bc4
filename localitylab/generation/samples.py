"""A sample set on disk: `samples.npz` (uint8 images, their conditioning labels, and how
they were drawn) and `samples.png` (a grid, one row per class), both written atomically."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from localitylab.errors import UserError
from localitylab.io import atomic_path

ARRAY_NAME = "samples.npz"
GRID_NAME = "samples.png"
MIN_TILE_PX = 32  # small images (8x8 digits) are enlarged, pixel for pixel, to at least this


@dataclass
class SampleSet:
    """Generated images (N, C, H, W) uint8 in natural pixel order, the labels they were
    conditioned on, and the record of how they were drawn (run, sampler, steps, guidance, seed)."""

    images: torch.Tensor
    labels: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"samples must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} samples but {len(self.labels)} labels")

    @property
    def setting(self) -> str:
        """'ddim, 50 steps, guidance 2' : how these samples were drawn, for table rows."""
        meta = self.meta
        if "sampler" not in meta:
            return ""
        return f"{meta['sampler']}, {meta['steps']} steps, guidance {meta['guidance']:g}"


def write_samples(folder: str | Path, samples: SampleSet) -> tuple[Path, Path]:
    """Write `samples.npz` and `samples.png` into `folder`; returns their paths."""
    folder = Path(folder)
    array_path, grid_path = folder / ARRAY_NAME, folder / GRID_NAME
    with atomic_path(array_path) as tmp, open(tmp, "wb") as handle:
        # A file handle, not a name: numpy would append ".npz" to the temporary name.
        np.savez(handle, images=samples.images.numpy(), labels=samples.labels.numpy().astype(np.int64),
                 meta=np.array(json.dumps(samples.meta, sort_keys=True)))
    write_grid(grid_path, samples.images, samples.labels)
    return array_path, grid_path


def read_samples(path: str | Path) -> SampleSet:
    """A sample set from `samples.npz` (or the folder that holds it); a UserError if it is not one."""
    path = Path(path)
    if path.is_dir():
        path = path / ARRAY_NAME
    if not path.is_file():
        raise UserError(f"no sample set at {path}; write one with `localitylab sample RUN`")
    try:
        with np.load(path, allow_pickle=False) as data:
            images, labels, meta = data["images"], data["labels"], json.loads(str(data["meta"]))
        return SampleSet(torch.from_numpy(images), torch.from_numpy(labels).long(), meta)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not a localitylab sample set: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def grid_array(images: torch.Tensor, labels: torch.Tensor, max_classes: int = 10, per_class: int = 10) -> np.ndarray:
    """(H, W, 3) uint8: one row per class (the first `max_classes` classes present), the first
    `per_class` samples of each; small images enlarged by whole pixels."""
    from torchvision.utils import make_grid

    classes = sorted(set(labels.tolist()))[:max_classes]
    rows = []
    for label in classes:
        chosen = images[labels == label][:per_class]
        pad = images.new_zeros((per_class - len(chosen), *images.shape[1:]))
        rows.append(torch.cat([chosen, pad]))
    tiles = torch.cat(rows) if rows else images[:0]
    if tiles.shape[1] == 1:
        tiles = tiles.expand(-1, 3, -1, -1)
    scale = max(1, -(-MIN_TILE_PX // tiles.shape[-1]))
    tiles = tiles.repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)
    grid = make_grid(tiles, nrow=per_class, padding=2, pad_value=255)
    return grid.permute(1, 2, 0).contiguous().numpy()


def write_grid(path: str | Path, images: torch.Tensor, labels: torch.Tensor) -> Path:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(grid_array(images, labels)).save(tmp, format="PNG")
    return Path(path)

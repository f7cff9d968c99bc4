"""A timm model's own input pipeline: size, interpolation, crop, mean and std.

Weights trained elsewhere expect the images they were trained on: a CLIP or a DINOv2 fed
another normalisation or size sees other inputs, silently. timm records the pipeline in
each model's pretrained config; `resolve_model_data_config` reads it and
`create_transform` builds it. This module uses both and splits the result where localitylab
holds its images: the geometric part (resize, crop) turns uint8 images into uint8 images at
the model's input size (timm's own transform in its prefetcher form, `use_prefetcher=True`),
and the value part (scale to [0, 1], subtract the mean, divide by the std) happens on the
device, as for every data set (`DataInfo.normalise`). The two together equal timm's
`create_transform(**config)` applied to the same image.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn


@dataclass(frozen=True)
class Preprocessing:
    """timm's data config for one model (what `resolve_model_data_config` returns), and where it came from."""

    input_size: tuple[int, int, int]  # (channels, height, width)
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    crop_mode: str
    source: str  # e.g. "timm pretrained_cfg of vit_base_patch16_224.augreg_in21k", "+ img_size 64"

    @classmethod
    def of_model(cls, model: nn.Module, img_size: int | None = None, source: str = "") -> "Preprocessing":
        """The pipeline timm resolves for `model`; `img_size` overrides its input size (on purpose only)."""
        from timm.data import resolve_model_data_config

        config = resolve_model_data_config(model, args={"img_size": img_size} if img_size else None)
        return cls(tuple(int(v) for v in config["input_size"]), str(config["interpolation"]),
                   tuple(float(v) for v in config["mean"]), tuple(float(v) for v in config["std"]),
                   float(config["crop_pct"]), str(config["crop_mode"]), source)

    @property
    def img_size(self) -> int:
        """The side of the (square) images the model takes."""
        return max(self.input_size[1:])

    @property
    def scale_size(self) -> int:
        """The side timm resizes to before cropping: floor(size / crop_pct)."""
        return math.floor(self.img_size / self.crop_pct)

    def config(self) -> dict[str, Any]:
        """timm's data config (the keyword arguments of `create_transform`)."""
        return {"input_size": self.input_size, "interpolation": self.interpolation, "mean": self.mean,
                "std": self.std, "crop_pct": self.crop_pct, "crop_mode": self.crop_mode}

    def transform(self):
        """timm's own evaluation transform: PIL image -> normalised float tensor."""
        from timm.data import create_transform

        return create_transform(**self.config(), is_training=False)

    def geometric_transform(self):
        """The same transform without the value part: PIL image -> uint8 tensor (timm's prefetcher form)."""
        from timm.data import create_transform

        return create_transform(**self.config(), is_training=False, use_prefetcher=True)

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) images of any size -> uint8 (N, 3, h, w) at the model's input size,
        each through timm's transform as a PIL image (grey images made RGB, as timm's data
        sets read them, for a model that takes three channels)."""
        from PIL import Image

        mode = {1: "L", 3: "RGB"}.get(self.input_size[0])
        if mode is None:
            raise ValueError(f"images cannot be made into {self.input_size[0]} channels")
        transform = self.geometric_transform()
        out = []
        for image in images.cpu():
            array = image.numpy()
            pil = Image.fromarray(array[0] if array.shape[0] == 1 else np.ascontiguousarray(array.transpose(1, 2, 0)))
            out.append(transform(pil.convert(mode)))
        return torch.stack(out) if out else images.new_zeros((0, *self.input_size))

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["scale_size"] = self.scale_size
        return record

"""The images a researcher has, made into what `localitylab.probe` measures.

Accepted: uint8 or float images as (N, C, H, W), (N, H, W, C) or (N, H, W) (numpy or torch),
a list of arrays, tensors or PIL images of any sizes, a torch `Dataset` (items `image` or
`(image, label, ...)`) or a `DataLoader` (batches the same). The channel axis is the one of
size 1 or 3; a shape where both ends could be it is refused unless `layout` says which.
Images not at the size the model takes are resized with the model's own interpolation
(timm's transform for a timm model, bilinear with antialiasing for a localitylab model), and
the call says so once.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from localitylab.errors import UserError

LAYOUTS = ("NCHW", "NHWC")
CHANNELS = (1, 3)


def collect(images: Any, labels: Any, layout: str | None = None) -> tuple[torch.Tensor | list[torch.Tensor],
                                                                          torch.Tensor | None]:
    """(images, labels): one (N, C, H, W) tensor when every image has one shape, else a list of
    (C, H, W) tensors; labels from the Dataset/DataLoader when none are given."""
    if layout is not None and layout not in LAYOUTS:
        raise UserError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}", setting="layout")
    from torch.utils.data import DataLoader, Dataset

    found: list | None = None
    if isinstance(images, DataLoader):
        items, found = [], []
        for batch in images:
            batch_images, batch_labels = _split_item(batch)
            items += list(_batch(batch_images, layout))
            if batch_labels is not None:
                found += [int(v) for v in torch.as_tensor(batch_labels).reshape(-1)]
    elif isinstance(images, Dataset):
        items, found = [], []
        for index in range(len(images)):
            image, label = _split_item(images[index])
            items.append(_one(image, layout))
            if label is not None:
                found.append(int(torch.as_tensor(label).reshape(-1)[0]))
    elif isinstance(images, (list, tuple)):
        items = [_one(image, layout) for image in images]
    else:
        items = list(_batch(images, layout))
    if not items:
        raise UserError("images must hold at least one image, got none")
    if len({item.dtype for item in items}) > 1:
        raise UserError(f"images mix dtypes ({', '.join(sorted({str(i.dtype) for i in items}))}): pass one dtype")
    if labels is None and found and len(found) == len(items):
        labels = found
    if labels is not None:
        labels = torch.as_tensor(labels).long().reshape(-1)
        if len(labels) != len(items):
            raise UserError(f"{len(labels)} labels for {len(items)} images")
    if len({tuple(item.shape) for item in items}) == 1:
        return torch.stack(items), labels
    return items, labels


def _split_item(item: Any) -> tuple[Any, Any]:
    if isinstance(item, (list, tuple)) and len(item) >= 2:
        return item[0], item[1]
    if isinstance(item, dict):
        image = next((item[k] for k in ("image", "img", "pixel_values") if k in item), None)
        if image is None:
            raise UserError(f"a Dataset item that is a dict needs an 'image' key, got keys {sorted(item)}")
        return image, item.get("label")
    return item, None


def _array(image: Any) -> torch.Tensor:
    if hasattr(image, "getbands"):  # a PIL image
        image = np.array(image.convert("RGB") if image.mode not in ("L", "RGB") else image)  # a writable copy
    try:
        if not isinstance(image, torch.Tensor):
            image = np.asarray(image)
            image = image if image.flags.writeable else image.copy()
        tensor = torch.as_tensor(image)
    except (TypeError, ValueError, RuntimeError) as error:
        raise UserError(f"images must be arrays, tensors or PIL images, got {type(image).__name__}") from error
    if tensor.dtype != torch.uint8 and not tensor.is_floating_point():
        raise UserError(f"images must be uint8 (0-255) or floats, got {tensor.dtype}")
    return tensor


def _batch(images: Any, layout: str | None):
    tensor = _array(images)
    if tensor.dim() == 3:
        tensor = tensor[:, None]
    if tensor.dim() != 4 or len(tensor) == 0:
        raise UserError(f"images must be a batch (N, C, H, W), (N, H, W, C) or (N, H, W) with N >= 1, "
                        f"got shape {tuple(tensor.shape)}")
    if _channels_last(tuple(tensor.shape[1:]), layout):
        tensor = tensor.permute(0, 3, 1, 2)
    return tensor.contiguous().unbind(0)


def _one(image: Any, layout: str | None) -> torch.Tensor:
    tensor = _array(image)
    if tensor.dim() == 2:
        return tensor[None].contiguous()
    if tensor.dim() != 3:
        raise UserError(f"each image must be (C, H, W), (H, W, C) or (H, W), got shape {tuple(tensor.shape)}")
    return (tensor.permute(2, 0, 1) if _channels_last(tuple(tensor.shape), layout) else tensor).contiguous()


def _channels_last(shape: tuple[int, ...], layout: str | None) -> bool:
    """Whether an image of `shape` (three sides) has its channels last."""
    if layout is not None:
        return layout == "NHWC"
    first, last = shape[0] in CHANNELS, shape[-1] in CHANNELS
    if first != last:
        return last
    if first:
        raise UserError(f"cannot tell whether images of shape {shape} are (C, H, W) or (H, W, C): pass "
                        "layout='NCHW' or layout='NHWC'", setting="layout")
    raise UserError(f"images of shape {shape} have no channel axis of size 1 or 3 first or last", setting="layout")


def fit_to_model(target: Any, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """uint8 images (a batch or a list of any sizes) -> one uint8 batch at the size and channels
    the model takes, warning once when any image had to be resized."""
    pipeline = target.preprocessing
    chans, side = (pipeline.input_size[0], pipeline.input_size[1:]) if pipeline else (
        target.data.in_chans, (target.data.img_size, target.data.img_size))
    items = list(images)
    sizes = sorted({tuple(item.shape[1:]) for item in items})
    if all(tuple(item.shape[1:]) == tuple(side) and item.shape[0] == chans for item in items):
        return torch.stack(items)
    how = f"{pipeline.interpolation} (timm's transform of the model)" if pipeline else "bilinear with antialiasing"
    resized = any(size != tuple(side) for size in sizes)
    if resized:
        shown = ", ".join("x".join(map(str, s)) for s in sizes[:3]) + (", ..." if len(sizes) > 3 else "")
        warnings.warn(f"images of {shown} px resized to {side[0]}x{side[1]}, the size {target.display_name} takes, "
                      f"{how}", stacklevel=3)
    if pipeline is not None:
        return torch.cat([pipeline.resize(item[None]) for item in items])
    return torch.cat([_resize(item, chans, tuple(side)) for item in items])


def _resize(image: torch.Tensor, chans: int, side: tuple[int, int]) -> torch.Tensor:
    if image.shape[0] != chans:
        if image.shape[0] == 1 and chans == 3:
            image = image.expand(3, -1, -1)
        elif image.shape[0] == 3 and chans == 1:
            from torchvision.transforms.functional import rgb_to_grayscale

            image = rgb_to_grayscale(image)
        else:
            raise UserError(f"images with {image.shape[0]} channels cannot feed a model that takes {chans}")
    if tuple(image.shape[1:]) == side:
        return image[None].contiguous()
    from torchvision.transforms.v2.functional import resize

    return resize(image[None].contiguous(), list(side), antialias=True)  # bilinear, uint8 in and out


def check_prepared(images: torch.Tensor | list[torch.Tensor], expects: str) -> torch.Tensor:
    """Float images are the model's input as they are: one size, the model's; warn when they
    look like unnormalised [0, 1] pixels (`expects`: what the model's input is)."""
    if isinstance(images, list):
        raise UserError("float images are taken as prepared (the model's input) and must share one size: pass "
                        "uint8 images to have them resized")
    if images.numel() and float(images.min()) >= 0.0 and float(images.max()) <= 1.0:
        warnings.warn(f"float images in [0, 1] are taken as prepared: the model's input as it is, {expects}, "
                      "not normalised by the probe; pass uint8 images (0-255) to have them prepared", stacklevel=3)
    return images


def short(values: Any) -> str:
    return "(" + ", ".join(f"{float(v):.3g}" for v in values) + ")"

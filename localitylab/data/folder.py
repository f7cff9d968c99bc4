"""`folder:PATH`: an image-folder layout, PATH/train/<class>/* and PATH/val/<class>/*."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from localitylab.data.registry import DataOptions, ImageDataset, make_dataset, register_dataset
from localitylab.errors import UserError


def _read_split(root: Path, size: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    from PIL import Image, UnidentifiedImageError
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset as list_samples
    from torchvision.transforms import functional as TF

    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    if not classes:
        raise UserError(f"{root} has no class folders; expected {root}/<class>/<image>")
    index = {name: i for i, name in enumerate(classes)}
    try:
        samples = list_samples(str(root), index, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as err:
        raise UserError(f"{root}: {err}") from None
    images, labels = [], []
    for path, label in samples:
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                # Resize the shorter side, then centre-crop: no distortion of the aspect ratio.
                img = TF.center_crop(TF.resize(img, size), [size, size])
                images.append(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
        except (UnidentifiedImageError, OSError) as err:
            raise UserError(f"{path} is not a readable image: {err}") from None
        labels.append(label)
    if not images:
        raise UserError(f"{root} holds no images ({', '.join(sorted(IMG_EXTENSIONS))})")
    return classes, torch.from_numpy(np.stack(images)), torch.tensor(labels)


@register_dataset("folder", "your images: PATH/train/<class>/*, PATH/val/<class>/*, resized to --img-size", prefix=True,
                  availability=lambda opts: "any folder you name")
def load_folder(path: str, options: DataOptions) -> ImageDataset:
    root = Path(path).expanduser()
    if not options.img_size:
        raise UserError(f"folder:{path} needs --img-size (e.g. 32 or 224)")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"{root / split} is not a folder; expected {root}/train/<class>/ and {root}/val/<class>/")
    train_classes, train_x, train_y = _read_split(root / "train", options.img_size)
    val_classes, val_x, val_y = _read_split(root / "val", options.img_size)
    if train_classes != val_classes:
        raise UserError(f"{root}: train and val have different class folders")
    return make_dataset(f"folder:{path}", train_x, train_y, val_x, val_y, train_classes, hflip=True)

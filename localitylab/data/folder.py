"""`folder:PATH`: an image-folder layout, PATH/train/<class>/* and PATH/val/<class>/*.

Files are listed as torchvision's ImageFolder lists them (sorted class folders, the image
extensions it knows), decoded and resized by `data/images.py`, and kept in the decoded-image
cache (`data/cache.py`) keyed by every file's path, size and modification time.

No flips by default: localitylab cannot know whether a mirrored image in your folder is
still of its class (digits, letters and text are not), so `hflip` is yours to give.
"""

from __future__ import annotations

from pathlib import Path

import torch

from localitylab.data.cache import DecodedSplits, cached_decode
from localitylab.data.files import file_stamp
from localitylab.data.images import decode_images
from localitylab.data.registry import DataDefaults, DataOptions, ImageDataset, make_dataset, register_dataset
from localitylab.errors import UserError


def list_image_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(path, label)]) of ROOT/<class>/..., as torchvision's ImageFolder finds them."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset as list_samples

    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    if not classes:
        raise UserError(f"{root} has no class folders; expected {root}/<class>/<image>")
    index = {name: i for i, name in enumerate(classes)}
    try:
        samples = list_samples(str(root), index, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as err:
        raise UserError(f"{root}: {err}") from None
    return classes, samples


def decode_samples(samples: list[tuple[str, int]], size: int | None, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = decode_images(((path, path) for path, _ in samples), len(samples), size, what)
    return images, torch.tensor([label for _, label in samples], dtype=torch.long)


FOLDER_DEFAULTS = DataDefaults(hflip=False)


@register_dataset("folder", "your images: PATH/train/<class>/*, PATH/val/<class>/*, resized to `img_size`", prefix=True,
                  availability=lambda opts: "any folder you name", defaults=FOLDER_DEFAULTS)
def load_folder(path: str, options: DataOptions) -> ImageDataset:
    root = Path(path).expanduser()
    if not options.img_size:
        raise UserError(f"folder:{path} needs img_size (e.g. 32 or 224)", setting="img_size")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"{root / split} is not a folder; expected {root}/train/<class>/ and {root}/val/<class>/")
    train_classes, train_samples = list_image_folder(root / "train")
    val_classes, val_samples = list_image_folder(root / "val")
    if train_classes != val_classes:
        raise UserError(f"{root}: train and val have different class folders")
    size = options.img_size

    def build() -> DecodedSplits:
        train_x, train_y = decode_samples(train_samples, size, f"folder:{path} train")
        val_x, val_y = decode_samples(val_samples, size, f"folder:{path} val")
        return DecodedSplits(train_x, train_y, val_x, val_y, train_classes)

    key = {"size": size, "classes": train_classes,
           "files": [[*file_stamp(Path(p)), label] for p, label in train_samples + val_samples]}
    cache: dict = {}
    data = cached_decode(f"folder-{root.name}", key, build, enabled=options.cache, info=cache)
    dataset = make_dataset(f"folder:{path}", data.train_images, data.train_labels, data.test_images, data.test_labels,
                           data.class_names, **FOLDER_DEFAULTS.augmentation())
    dataset.extra["cache"] = cache
    return dataset

"""One registry for every data set, and the in-memory form they all share.

A data set is held as uint8 tensors (N, C, H, W) plus labels: small enough to keep on the
training device whole, so batches are cut, augmented and normalised there (see
`batching.py`) and Python data loading never starves a GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from localitylab.errors import UserError


@dataclass(frozen=True)
class DataOptions:
    """Where and how to get a data set; every loader takes the same options."""

    data_dir: Path | None = None
    download: bool = False
    img_size: int | None = None  # folder: resize to this; generated sets: their size
    seed: int = 0


@dataclass
class DataInfo:
    """What a model needs to know about its data: shapes, normalisation, classes, permutation.

    Stored in every checkpoint, so a loaded model prepares images exactly as in training.
    """

    name: str
    img_size: int
    in_chans: int
    class_names: list[str]
    mean: list[float]
    std: list[float]
    hflip: bool = False
    crop_padding: int = 0
    permutation: torch.Tensor | None = None  # LongTensor over H*W positions, or None
    permute_seed: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float, scaled to [0, 1] then standardised per channel."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images.float() / 255.0 - mean) / std

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """What the model sees at test time: the recorded permutation, then normalisation."""
        if self.permutation is not None:
            from localitylab.data.permutation import permute_pixels

            images = permute_pixels(images, self.permutation.to(images.device))
        return self.normalise(images)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "img_size": self.img_size,
            "in_chans": self.in_chans,
            "class_names": list(self.class_names),
            "mean": list(self.mean),
            "std": list(self.std),
            "hflip": self.hflip,
            "crop_padding": self.crop_padding,
            "permutation": self.permutation,
            "permute_seed": self.permute_seed,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "DataInfo":
        return cls(**data)


@dataclass
class ImageDataset:
    """A whole data set in memory as uint8 images and int64 labels."""

    info: DataInfo
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.info.name

    def split(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        if which == "train":
            return self.train_images, self.train_labels
        if which == "test":
            return self.test_images, self.test_labels
        raise UserError(f"unknown split {which!r}; valid: train, test")


def make_dataset(
    name: str,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    class_names: list[str],
    hflip: bool,
    crop_padding: int | None = None,
) -> ImageDataset:
    """Assemble a data set; normalisation statistics come from the training images."""
    if train_images.dtype != torch.uint8 or train_images.ndim != 4:
        raise ValueError("images must be uint8 (N, C, H, W)")
    if len(train_images) == 0 or len(test_images) == 0:
        raise UserError(f"data set {name!r} has an empty train or test split")
    scaled = train_images.float() / 255.0
    mean = scaled.mean(dim=(0, 2, 3))
    std = scaled.std(dim=(0, 2, 3)).clamp_min(1e-3)
    size = train_images.shape[-1]
    info = DataInfo(
        name=name,
        img_size=int(size),
        in_chans=int(train_images.shape[1]),
        class_names=list(class_names),
        mean=[round(float(m), 6) for m in mean],
        std=[round(float(s), 6) for s in std],
        hflip=hflip,
        # The usual CIFAR recipe pads 4 pixels on 32: one eighth of the side.
        crop_padding=max(1, size // 8) if crop_padding is None else crop_padding,
    )
    return ImageDataset(info, train_images, train_labels.long(), test_images, test_labels.long())


@dataclass(frozen=True)
class DatasetEntry:
    name: str  # 'digits', 'cifar10', 'shapes' (sized: 'shapes-S'), 'folder' (prefix: 'folder:PATH')
    loader: Callable[..., ImageDataset]
    summary: str
    availability: Callable[[DataOptions], str]  # what is here, and how to get the rest
    sized: bool = False
    prefix: bool = False


_DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(name: str, summary: str, availability: Callable[[DataOptions], str] | None = None,
                     sized: bool = False, prefix: bool = False):
    def wrap(loader: Callable[..., ImageDataset]):
        if name in _DATASETS:
            raise ValueError(f"data set {name!r} registered twice")
        _DATASETS[name] = DatasetEntry(name, loader, summary, availability or (lambda opts: "built in"), sized, prefix)
        return loader

    return wrap


def dataset_entries() -> list[DatasetEntry]:
    _ensure_loaded()
    return list(_DATASETS.values())


def valid_dataset_hint() -> str:
    _ensure_loaded()
    names = []
    for e in _DATASETS.values():
        names.append(f"{e.name}:PATH" if e.prefix else f"{e.name}-S" if e.sized else e.name)
    return ", ".join(names)


_SIZED = re.compile(r"^(?P<family>[a-z0-9]+)-(?P<size>\d+)$")


def check_dataset_name(name: str) -> None:
    """Raise a UserError unless `name` is a data set the registry can load (nothing is loaded)."""
    _ensure_loaded()
    if ":" in name:
        family = name.split(":", 1)[0]
        if family in _DATASETS and _DATASETS[family].prefix:
            return
    elif name in _DATASETS and not _DATASETS[name].sized and not _DATASETS[name].prefix:
        return
    else:
        match = _SIZED.match(name)
        if match and match["family"] in _DATASETS and _DATASETS[match["family"]].sized:
            return
    raise UserError(f"unknown data set {name!r}; valid: {valid_dataset_hint()}")


def load_dataset(name: str, options: DataOptions | None = None) -> ImageDataset:
    """Load a registry data set by the name users type: 'digits', 'cifar100', 'shapes-32', 'folder:PATH'."""
    _ensure_loaded()
    options = options or DataOptions()
    if options.img_size is not None and (isinstance(options.img_size, bool) or not isinstance(options.img_size, int)
                                         or not 1 <= options.img_size <= MAX_IMG_SIZE):
        raise UserError(f"--img-size must be a whole number of pixels from 1 to {MAX_IMG_SIZE}, got {options.img_size!r}")
    if ":" in name:
        family, arg = name.split(":", 1)
        entry = _DATASETS.get(family)
        if entry is None or not entry.prefix:
            raise UserError(f"unknown data set {name!r}; valid: {valid_dataset_hint()}")
        return entry.loader(arg, options)
    entry = _DATASETS.get(name)
    if entry is not None and not entry.sized and not entry.prefix:
        return _fixed_size(entry.loader(options), options)
    match = _SIZED.match(name)
    if match and match["family"] in _DATASETS and _DATASETS[match["family"]].sized:
        size = int(match["size"])
        if not 4 <= size <= 512:
            raise UserError(f"{name}: size must be between 4 and 512 pixels, got {size}")
        if options.img_size is not None and options.img_size != size:
            raise UserError(f"{name} images are {size}x{size}; --img-size {options.img_size} disagrees "
                            f"(use {match['family']}-{options.img_size} for another size)")
        return _DATASETS[match["family"]].loader(size, options)
    raise UserError(f"unknown data set {name!r}; valid: {valid_dataset_hint()}")


# --img-size beyond this is a typo, not a data set that fits in memory.
MAX_IMG_SIZE = 4096


def _fixed_size(dataset: ImageDataset, options: DataOptions) -> ImageDataset:
    """A data set with one image size ignores nothing silently: a different --img-size is an error."""
    if options.img_size is not None and options.img_size != dataset.info.img_size:
        size = dataset.info.img_size
        raise UserError(f"{dataset.name} images are {size}x{size}; --img-size applies to folder: data sets only "
                        f"(got {options.img_size})")
    return dataset


_families_loaded = False


def _ensure_loaded() -> None:
    # The loaders register themselves on import; import them on first use, not at start-up.
    global _families_loaded
    if not _families_loaded:
        _families_loaded = True
        from localitylab.data import cifar, digits, folder, generated  # noqa: F401

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
    img_size: int | None = None  # folder:, hf:, imagenet: resize to this; generated sets: their size
    seed: int = 0
    # Training augmentation; None takes the data set's default (`DataDefaults`).
    hflip: bool | None = None
    crop_padding: int | None = None
    cache: bool = True  # the decoded-image cache of folder:, hf: and the image-file sets (data/cache.py)
    image_column: str | None = None  # hf: the image and label columns, when they cannot be found
    label_column: str | None = None


@dataclass(frozen=True)
class DataDefaults:
    """The recipe that suits a data set, for every setting the user leaves unset.

    Registered with the data set and applied by its loader: the flip and crop become the
    loaded set's `DataInfo.hflip` / `crop_padding` (what the batches use); batch size and
    warm-up are for the training side, read with `dataset_defaults(name)` before loading.
    """

    batch_size: int = 128
    warmup_epochs: float = 5.0
    hflip: bool = False  # only where a mirror image is still of the same class
    crop_padding: int | None = None  # random-crop zero padding in pixels; None: 1/8 of the side
    # The initial std of a learned position table (pit, vit, dit); None: the models' own,
    # timm's 0.02 (localitylab.models.pos_embed.POS_EMBED_STD).
    pos_embed_std: float | None = None

    def crop_for(self, img_size: int) -> int:
        # The usual CIFAR recipe pads 4 pixels on 32: one eighth of the side.
        return max(1, img_size // 8) if self.crop_padding is None else self.crop_padding

    def augmentation(self) -> dict:
        """make_dataset's keyword arguments for this flip and crop."""
        return {"hflip": self.hflip, "crop_padding": self.crop_padding}

    def describe(self) -> str:
        crop = "1/8 of the side" if self.crop_padding is None else f"{self.crop_padding} px"
        epochs = f"{self.warmup_epochs:g} epoch{'' if self.warmup_epochs == 1 else 's'}"
        table = "" if self.pos_embed_std is None else f", learned position tables from std {self.pos_embed_std:g}"
        return f"batch {self.batch_size}, warm-up {epochs}, crop {crop}, {'flips' if self.hflip else 'no flips'}{table}"


@dataclass(frozen=True)
class DataShape:
    """What a model needs to know about a data set, where it is known without loading it."""

    img_size: int
    in_chans: int
    num_classes: int
    train_images: int


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
    # How `permutation` was drawn, as `permutation_for_setting(permute_setting, H, W, permute_seed)`
    # rebuilds it: 'global' (permute_pixels) or 'swaps-T-d' (swaps); None in older checkpoints.
    permute_setting: str | None = None

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
            "permute_setting": self.permute_setting,
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


def channel_stats(images: torch.Tensor, chunk: int = 2**26) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (unbiased) standard deviation of uint8 images scaled to [0, 1].

    Small sets are reduced in one go; a set of more than `chunk` values (ImageNet at 64x64 is
    15 billion) in float64 sums over slices, never as one float copy of the whole set."""
    if images.numel() <= chunk:
        scaled = images.float() / 255.0
        return scaled.mean(dim=(0, 2, 3)), scaled.std(dim=(0, 2, 3)).clamp_min(1e-3)
    per_image = max(1, images[0].numel())
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros(images.shape[1], dtype=torch.float64)
    for start in range(0, len(images), max(1, chunk // per_image)):
        part = images[start:start + max(1, chunk // per_image)].double() / 255.0
        total += part.sum(dim=(0, 2, 3))
        squares += (part * part).sum(dim=(0, 2, 3))
    count = images.numel() // images.shape[1]
    mean = total / count
    variance = (squares - count * mean * mean) / max(1, count - 1)
    return mean.float(), variance.clamp_min(0).sqrt().float().clamp_min(1e-3)


def make_dataset(
    name: str,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    class_names: list[str],
    hflip: bool = False,
    crop_padding: int | None = None,
) -> ImageDataset:
    """Assemble a data set; normalisation statistics come from the training images. A
    registered loader passes its entry's `DataDefaults.augmentation()` as `hflip` and
    `crop_padding`; `load_dataset` then applies the user's choice, if any."""
    if train_images.dtype != torch.uint8 or train_images.ndim != 4:
        raise ValueError("images must be uint8 (N, C, H, W)")
    if len(train_images) == 0 or len(test_images) == 0:
        raise UserError(f"data set {name!r} has an empty train or test split")
    mean, std = channel_stats(train_images)
    size = train_images.shape[-1]
    info = DataInfo(
        name=name,
        img_size=int(size),
        in_chans=int(train_images.shape[1]),
        class_names=list(class_names),
        mean=[round(float(m), 6) for m in mean],
        std=[round(float(s), 6) for s in std],
        hflip=hflip,
        crop_padding=DataDefaults(crop_padding=crop_padding).crop_for(int(size)),
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
    # The recipe defaults, or a function of the full name for a family whose members differ.
    defaults: DataDefaults | Callable[[str], DataDefaults] = DataDefaults()
    resizable: bool = False  # a fixed name that takes img_size (its files are decoded images)
    shape: DataShape | None = None  # known without loading (fixed-size sets that are not bundled)

    @property
    def pattern(self) -> str:
        """The name as a user types it: 'digits', 'shapes-S', 'folder:PATH'."""
        return f"{self.name}:{self.arg_name}" if self.prefix else f"{self.name}-S" if self.sized else self.name

    @property
    def arg_name(self) -> str:
        return "NAME[:CONFIG]" if self.name == "hf" else "PATH"

    def defaults_for(self, name: str) -> DataDefaults:
        return self.defaults(name) if callable(self.defaults) else self.defaults


_DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(name: str, summary: str, availability: Callable[[DataOptions], str] | None = None,
                     sized: bool = False, prefix: bool = False,
                     defaults: DataDefaults | Callable[[str], DataDefaults] = DataDefaults(),
                     resizable: bool = False, shape: DataShape | None = None):
    def wrap(loader: Callable[..., ImageDataset]):
        if name in _DATASETS:
            raise ValueError(f"data set {name!r} registered twice")
        _DATASETS[name] = DatasetEntry(name, loader, summary, availability or (lambda opts: "built in"), sized, prefix,
                                       defaults, resizable, shape)
        return loader

    return wrap


def dataset_entries() -> list[DatasetEntry]:
    return _listed()


def valid_dataset_hint() -> str:
    return ", ".join(e.pattern for e in _listed())


_SIZED = re.compile(r"^(?P<family>[a-z0-9]+)-(?P<size>\d+)$")


def _resolve(name: str) -> tuple[DatasetEntry, str | int | None]:
    """The entry a user-typed name belongs to, with its argument: the PATH of a prefix name,
    the size S of a sized one, None for a fixed name. Loads nothing."""
    if ":" in name:
        family, arg = name.split(":", 1)
        entry = _DATASETS.get(family)
        if entry is not None and entry.prefix:
            return entry, arg
    elif name in _DATASETS and not _DATASETS[name].sized and not _DATASETS[name].prefix:
        return _DATASETS[name], None
    else:
        match = _SIZED.match(name)
        if match and match["family"] in _DATASETS and _DATASETS[match["family"]].sized:
            return _DATASETS[match["family"]], int(match["size"])
    raise UserError(f"unknown data set {name!r}; valid: {valid_dataset_hint()}")


def check_dataset_name(name: str) -> None:
    """Raise a UserError unless `name` is a data set the registry can load (nothing is loaded)."""
    _resolve(name)


def dataset_defaults(name: str) -> DataDefaults:
    """The recipe defaults of the data set `name` (batch size, warm-up, flip, crop), without loading it."""
    entry, _ = _resolve(name)
    return entry.defaults_for(name)


def takes_img_size(name: str) -> bool:
    """Whether `name`'s images are resized to `img_size` (folder:, hf:, tiny-imagenet, imagenet)."""
    entry, _ = _resolve(name)
    return entry.prefix or entry.resizable


def known_shape(name: str) -> DataShape | None:
    """Image size, channels, classes and training images of `name` where known without loading it."""
    entry, _ = _resolve(name)
    return entry.shape


def load_dataset(name: str, options: DataOptions | None = None) -> ImageDataset:
    """Load a registry data set by the name users type: 'digits', 'cifar100', 'shapes-32', 'folder:PATH',
    'hf:NAME[:CONFIG]'. Its flip and crop are the user's choice in `options`, else the data set's default
    (`dataset_defaults(name)`, which its loader applies)."""
    options = options or DataOptions()
    if options.img_size is not None and (isinstance(options.img_size, bool) or not isinstance(options.img_size, int)
                                         or not 1 <= options.img_size <= MAX_IMG_SIZE):
        raise UserError(f"img_size must be a whole number of pixels from 1 to {MAX_IMG_SIZE}, got {options.img_size!r}",
                        setting="img_size")
    if options.crop_padding is not None and options.crop_padding < 0:
        raise UserError(f"crop_padding must be >= 0, got {options.crop_padding}", setting="crop_padding")
    entry, arg = _resolve(name)
    if entry.prefix:
        dataset = entry.loader(arg, options)
    elif entry.sized:
        size = int(arg)
        if not 4 <= size <= 512:
            raise UserError(f"{name}: size must be between 4 and 512 pixels, got {size}")
        if options.img_size is not None and options.img_size != size:
            raise UserError(f"{name} images are {size}x{size}; img_size {options.img_size} disagrees "
                            f"(use {entry.name}-{options.img_size} for another size)", setting="img_size")
        dataset = entry.loader(size, options)
    elif entry.resizable:
        dataset = entry.loader(options)
    else:
        dataset = _fixed_size(entry.loader(options), options)
    if options.hflip is not None:
        dataset.info.hflip = bool(options.hflip)
    if options.crop_padding is not None:
        dataset.info.crop_padding = options.crop_padding
    return dataset


# An img_size beyond this is a typo, not a data set that fits in memory.
MAX_IMG_SIZE = 4096


def _fixed_size(dataset: ImageDataset, options: DataOptions) -> ImageDataset:
    """A data set with one image size ignores nothing silently: a different img_size is an error."""
    if options.img_size is not None and options.img_size != dataset.info.img_size:
        size = dataset.info.img_size
        raise UserError(f"{dataset.name} images are {size}x{size}; img_size applies to folder:, hf:, "
                        f"tiny-imagenet and imagenet only (got {options.img_size})", setting="img_size")
    return dataset


# How listings and error messages order the built-in data sets: small to large, then your own
# data, then the generated sets. Sets registered elsewhere (benchmarks) follow.
LISTING_ORDER = ("digits", "mnist", "fashion-mnist", "svhn", "cifar10", "cifar100", "stl10", "tiny-imagenet", "imagenet",
                 "hf", "folder", "shapes", "stripes", "nonlocal")


def _listed() -> list[DatasetEntry]:
    rank = {name: i for i, name in enumerate(LISTING_ORDER)}
    return sorted(_DATASETS.values(), key=lambda entry: rank.get(entry.name, len(rank)))

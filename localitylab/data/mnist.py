"""MNIST and Fashion-MNIST from their official IDX files.

The four files (`train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`,
`t10k-images-idx3-ubyte.gz`, `t10k-labels-idx1-ubyte.gz`) live where torchvision keeps them,
DATA_DIR/MNIST/raw/ and DATA_DIR/FashionMNIST/raw/, gzipped (at any compression level: a
Linux distribution's recompressed copy is the same data) or extracted (as torchvision's
download leaves them). Files already there are read by their content, as torchvision does
(it checks that they exist): the IDX header (magic number, type, dimensions), 28x28 images,
as many labels as images, labels 0-9. `download` fetches them from torchvision's mirrors
and keeps a file only once its MD5 is the one torchvision pins.

IDX is a plain array format (a 4-byte magic number saying the type and the number of
dimensions, the dimensions as big-endian 32-bit integers, then the values): read with numpy,
no unpickling anywhere.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from localitylab.data.files import DownloadFailed, check_md5, data_root, download_first
from localitylab.data.registry import DataDefaults, DataOptions, DataShape, ImageDataset, make_dataset, register_dataset
from localitylab.errors import UserError

FILES = {  # split -> (images, labels), without .gz
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class IdxVariant:
    name: str
    folder: str  # under the data folder, as torchvision names it
    torchvision_class: str  # where the MD5s and mirrors come from
    summary: str
    defaults: DataDefaults

    def torchvision_dataset(self):
        import torchvision.datasets

        return getattr(torchvision.datasets, self.torchvision_class)

    def md5s(self) -> dict[str, str]:
        """MD5 of each gzipped file, as torchvision pins it."""
        return dict(self.torchvision_dataset().resources)

    def class_names(self) -> list[str]:
        if self.name == "mnist":
            return [str(d) for d in range(10)]
        return list(self.torchvision_dataset().classes)


# 28x28 with a blank border: a shift of 2 pixels keeps every stroke in the image. 469 steps
# an epoch at batch 128, so one epoch of warm-up. A mirrored digit is not a digit; mirrored
# clothes are still the same garment (shoes point the other way), so Fashion-MNIST flips.
MNIST = IdxVariant("mnist", "MNIST/raw", "MNIST", "MNIST: 28x28 grey handwritten digits, 10 classes, 60k/10k",
                   DataDefaults(batch_size=128, warmup_epochs=1, hflip=False, crop_padding=2))
FASHION_MNIST = IdxVariant("fashion-mnist", "FashionMNIST/raw", "FashionMNIST",
                           "Fashion-MNIST: 28x28 grey clothing, 10 classes, 60k/10k (Zalando)",
                           DataDefaults(batch_size=128, warmup_epochs=1, hflip=True, crop_padding=2))
VARIANTS = {v.name: v for v in (MNIST, FASHION_MNIST)}


def read_idx(raw: bytes, where: str, ndim: int) -> np.ndarray:
    """An IDX array of unsigned bytes with `ndim` dimensions."""
    header = 4 + 4 * ndim
    if len(raw) < header or raw[0] != 0 or raw[1] != 0:
        raise UserError(f"{where} is not an IDX file (bad magic number)")
    if raw[2] != 0x08 or raw[3] != ndim:
        raise UserError(f"{where}: expected unsigned bytes in {ndim} dimensions, the header says type "
                        f"0x{raw[2]:02x} in {raw[3]}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    values = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if values.size != int(np.prod(shape)):
        raise UserError(f"{where} holds {values.size} values; its header says {'x'.join(map(str, shape))}")
    return values.reshape(shape)


def _read_file(folder: Path, name: str, md5s: dict[str, str] | None) -> tuple[bytes, str]:
    """The IDX bytes of `name` or `name.gz` (gzipped or not, whatever its name says), and the
    path read; checked against `md5s` when given."""
    plain, packed = folder / name, folder / f"{name}.gz"
    path = plain if plain.is_file() else packed
    if md5s is not None:
        check_md5(path, md5s.get(path.name))
    raw = path.read_bytes()
    if raw[:2] != GZIP_MAGIC:
        return raw, str(path)
    try:
        return gzip.decompress(raw), str(path)
    except (OSError, EOFError, zlib.error) as err:
        raise UserError(f"{path} is not a readable gzip file (cut short or damaged): {err}") from None


GZIP_MAGIC = b"\x1f\x8b"


def _check_content(variant: "IdxVariant", split: str, images: np.ndarray, labels: np.ndarray, folder: Path,
                   where: str) -> None:
    """What makes the files this data set: 28x28 images, one label (0-9) for each."""
    if images.shape[1:] != (28, 28):
        raise UserError(f"{variant.name} {split}: the images in {folder} are {images.shape[1]}x{images.shape[2]}; "
                        f"{variant.name} images are 28x28")
    if len(images) != len(labels):
        raise UserError(f"{variant.name} {split}: {len(images)} images but {len(labels)} labels in {folder}")
    if len(labels) and int(labels.max()) >= 10:
        raise UserError(f"{where}: label {int(labels.max())} is not one of the 10 classes")


def _missing(folder: Path) -> list[str]:
    names = [name for pair in FILES.values() for name in pair]
    return [f"{name}.gz" for name in names if not (folder / name).is_file() and not (folder / f"{name}.gz").is_file()]


def load_idx_variant(variant: IdxVariant | str, options: DataOptions, md5s: dict[str, str] | None = None
                     ) -> ImageDataset:
    """Load MNIST or Fashion-MNIST, the files checked by their content; `md5s` (file name ->
    digest), when given, also pins the files' MD5s."""
    variant = VARIANTS[variant] if isinstance(variant, str) else variant
    folder = data_root(options.data_dir) / variant.folder
    expected = md5s
    missing = _missing(folder)
    if missing:
        if not options.download:
            raise UserError(f"{variant.name} not found: put {', '.join(missing)} in {folder}, "
                            f"or pass download to fetch them", setting="download")
        dataset = variant.torchvision_dataset()
        official = variant.md5s()
        for name in missing:
            try:
                download_first([f"{mirror}{name}" for mirror in dataset.mirrors], folder / name, official[name])
            except DownloadFailed as err:
                raise UserError(f"{variant.name}: could not download {name} ({err.reason}); put "
                                f"{', '.join(missing)} in {folder} by hand") from None
    splits = {}
    for split, (images_name, labels_name) in FILES.items():
        raw, where = _read_file(folder, images_name, expected)
        images = read_idx(raw, where, 3)
        raw, where = _read_file(folder, labels_name, expected)
        labels = read_idx(raw, where, 1)
        _check_content(variant, split, images, labels, folder, where)
        splits[split] = (torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    return make_dataset(variant.name, *splits["train"], *splits["test"], variant.class_names(),
                        **variant.defaults.augmentation())


def _availability(variant: IdxVariant):
    def check(options: DataOptions) -> str:
        folder = data_root(options.data_dir) / variant.folder
        missing = _missing(folder)
        return f"found {folder}" if not missing else f"not here: put the four IDX files in {folder} or train with `download`"

    return check


@register_dataset("mnist", MNIST.summary, _availability(MNIST), shape=DataShape(28, 1, 10, 60000),
                  defaults=MNIST.defaults)
def load_mnist(options: DataOptions) -> ImageDataset:
    return load_idx_variant(MNIST, options)


@register_dataset("fashion-mnist", FASHION_MNIST.summary, _availability(FASHION_MNIST),
                  shape=DataShape(28, 1, 10, 60000), defaults=FASHION_MNIST.defaults)
def load_fashion_mnist(options: DataOptions) -> ImageDataset:
    return load_idx_variant(FASHION_MNIST, options)

"""CIFAR-10 and CIFAR-100 from the official python-format archives.

Reads `cifar-10-python.tar.gz` / `cifar-100-python.tar.gz` (or their extracted folders)
from the data folder. The batches are pickles, so they are read with an unpickler that
admits only numpy's array reconstruction and nothing else: a tampered archive cannot run
code. Members are read straight from the tar file, never extracted, so no path in the
archive can write outside the data folder.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from localitylab.data.files import data_root, download, md5_of
from localitylab.data.registry import DataDefaults, DataOptions, DataShape, ImageDataset, make_dataset, register_dataset
from localitylab.errors import UserError


@dataclass(frozen=True)
class CifarVariant:
    name: str
    archive: str
    folder: str  # the folder inside the archive
    md5: str
    url: str
    train_members: tuple[str, ...]
    test_member: str
    meta_member: str
    label_key: bytes
    names_key: bytes


CIFAR10 = CifarVariant(
    "cifar10", "cifar-10-python.tar.gz", "cifar-10-batches-py", "c58f30108f718f92721af3b95e74349a",
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta", b"labels", b"label_names",
)
CIFAR100 = CifarVariant(
    "cifar100", "cifar-100-python.tar.gz", "cifar-100-python", "eb9058c3a382ffc7106e4002c42a8d85",
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    ("train",), "test", "meta", b"fine_labels", b"fine_label_names",
)
VARIANTS = {v.name: v for v in (CIFAR10, CIFAR100)}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Admits the globals a pickled numpy array needs, and refuses every other one."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # Python 3 writes bytes in protocol-2 pickles through it
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_batch(raw: bytes, where: str) -> dict:
    try:
        data = _ArraysOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:  # any failure of a foreign pickle is the file's fault
        raise UserError(f"{where} is not a CIFAR batch: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"{where} is not a CIFAR batch: expected a dict, got {type(data).__name__}")
    return data


class _Source:
    """The batches of one variant, from an extracted folder or straight from the archive."""

    def __init__(self, variant: CifarVariant, root: Path, md5: str | None):
        self.variant = variant
        folder = root / variant.folder
        archive = root / variant.archive
        self.folder = folder if folder.is_dir() else None
        self.archive = None
        if self.folder is None:
            if not archive.is_file():
                raise FileNotFoundError(archive)
            if md5 is not None:
                got = md5_of(archive)
                if got != md5:
                    raise UserError(
                        f"{archive} has MD5 {got}, expected {md5}: the file is damaged or not the official archive"
                    )
            self.archive = archive

    def read(self, member: str) -> dict:
        if self.folder is not None:
            path = self.folder / member
            if not path.is_file():
                raise UserError(f"{path} is missing: the folder is not a complete {self.variant.archive} extraction")
            return read_batch(path.read_bytes(), str(path))
        name = f"{self.variant.folder}/{member}"
        try:
            with tarfile.open(self.archive, "r:gz") as tar:
                handle = tar.extractfile(name)
                if handle is None:
                    raise KeyError(name)
                return read_batch(handle.read(), f"{self.archive}:{name}")
        except KeyError:
            raise UserError(f"{self.archive} has no member {name}") from None
        except (tarfile.TarError, OSError, EOFError) as err:
            raise UserError(f"{self.archive} is not a readable tar.gz archive: {err}") from None


def _images(batch: dict, where: str) -> np.ndarray:
    data = batch.get(b"data")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserError(f"{where}: 'data' must be an (N, 3072) uint8 array")
    return data.astype(np.uint8).reshape(-1, 3, 32, 32)


def load_cifar(variant: CifarVariant | str, options: DataOptions, md5: str | None = "official") -> ImageDataset:
    """Load a CIFAR variant. `md5='official'` checks an archive against the official
    checksum; pass another digest (tests with miniature archives) or None to skip."""
    variant = VARIANTS[variant] if isinstance(variant, str) else variant
    expected = variant.md5 if md5 == "official" else md5
    root = data_root(options.data_dir)
    try:
        source = _Source(variant, root, expected)
    except FileNotFoundError:
        if not options.download:
            raise UserError(
                f"{variant.name} not found: put {variant.archive} (or its extracted {variant.folder}/) in {root}, "
                f"or pass download to fetch it from {variant.url}", setting="download"
            ) from None
        download(variant.url, root / variant.archive, variant.md5)
        source = _Source(variant, root, None)  # just verified

    def split(members) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for member in members:
            batch = source.read(member)
            images.append(_images(batch, member))
            labels.append(np.asarray(batch.get(variant.label_key, []), dtype=np.int64))
            if len(labels[-1]) != len(images[-1]):
                raise UserError(f"{member}: {len(images[-1])} images but {len(labels[-1])} labels")
        return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))

    train_x, train_y = split(variant.train_members)
    test_x, test_y = split((variant.test_member,))
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in source.read(variant.meta_member).get(variant.names_key, [])]
    if not names or int(max(train_y.max(), test_y.max())) >= len(names):
        raise UserError(f"{variant.meta_member}: class names do not cover the labels")
    return make_dataset(variant.name, train_x, train_y, test_x, test_y, names, **CIFAR_DEFAULTS.augmentation())


def _availability(variant: CifarVariant):
    def check(options: DataOptions) -> str:
        root = data_root(options.data_dir)
        for candidate in (root / variant.folder, root / variant.archive):
            if candidate.exists():
                return f"found {candidate}"
        return f"not here: put {variant.archive} in {root} or train with `download`"

    return check


# The usual CIFAR recipe: random crops padded by 4 and horizontal flips (DeiT's recipe around it).
CIFAR_DEFAULTS = DataDefaults(batch_size=128, warmup_epochs=5, hflip=True, crop_padding=4)


@register_dataset("cifar10", "CIFAR-10: 32x32 colour, 10 classes, 50k/10k", _availability(CIFAR10),
                  defaults=CIFAR_DEFAULTS, shape=DataShape(32, 3, 10, 50000))
def load_cifar10(options: DataOptions) -> ImageDataset:
    return load_cifar(CIFAR10, options)


@register_dataset("cifar100", "CIFAR-100: 32x32 colour, 100 classes, 50k/10k", _availability(CIFAR100),
                  defaults=CIFAR_DEFAULTS, shape=DataShape(32, 3, 100, 50000))
def load_cifar100(options: DataOptions) -> ImageDataset:
    return load_cifar(CIFAR100, options)

"""STL-10 (96x96 colour, 10 classes, 5,000 labelled training and 8,000 test images) from the
official binary files.

DATA_DIR/stl10_binary/ holds `train_X.bin`, `train_y.bin`, `test_X.bin`, `test_y.bin` and
`class_names.txt`, as torchvision keeps them; or DATA_DIR/stl10_binary.tar.gz, whose five
members are then copied out once (by their fixed names only: nothing in the archive chooses
a path). Files are checked against the MD5s torchvision pins; `download` fetches the
archive. The .bin files are raw uint8 arrays, each image stored column-major (read with
numpy, as torchvision does); labels are 1..10. The 100,000 unlabelled images are not read.
"""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import numpy as np
import torch

from localitylab.data.files import check_md5, data_root, download
from localitylab.data.registry import DataDefaults, DataOptions, DataShape, ImageDataset, make_dataset, register_dataset
from localitylab.errors import UserError
from localitylab.io import atomic_path

FOLDER = "stl10_binary"
ARCHIVE = "stl10_binary.tar.gz"
MEMBERS = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "class_names.txt")
SIDE = 96
# Natural images: flips, and shifts of 1/8 of the side (12 pixels), as for CIFAR.
STL10_DEFAULTS = DataDefaults(batch_size=128, warmup_epochs=5, hflip=True, crop_padding=12)


def official() -> tuple[str, str, dict[str, str]]:
    """(archive url, archive md5, {member: md5}) from torchvision."""
    from torchvision.datasets import STL10

    return STL10.url, STL10.tgz_md5, dict(STL10.train_list + STL10.test_list)


def extract_members(archive: Path, folder: Path) -> None:
    """Copy the members localitylab reads out of the archive, each to a temporary name first."""
    wanted = {f"{FOLDER}/{name}" for name in MEMBERS}
    found = set()
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.name not in wanted:
                    continue
                if not member.isfile():
                    raise UserError(f"{archive}: {member.name} is not a regular file")
                _copy_out(tar.extractfile(member), folder / Path(member.name).name, archive)
                found.add(member.name)
                if found == wanted:
                    break
    except (tarfile.TarError, OSError, EOFError) as err:
        raise UserError(f"{archive} is not a readable tar.gz archive: {err}") from None
    if found != wanted:
        raise UserError(f"{archive} has no member {sorted(wanted - found)[0]}")


def _copy_out(source, dest: Path, archive: Path) -> None:
    try:
        with atomic_path(dest) as tmp, open(tmp, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
    except OSError as err:
        raise UserError(f"cannot write {dest} ({err.strerror or err}): extract {archive.name} into {dest.parent.parent} "
                        f"by hand, or give a data_dir you can write", setting="data_dir") from None


def read_images(path: Path) -> torch.Tensor:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % (3 * SIDE * SIDE):
        raise UserError(f"{path} holds {raw.size} bytes, not a whole number of 3x96x96 images")
    # Each image is stored column by column: the transpose puts rows first.
    return torch.from_numpy(raw.reshape(-1, 3, SIDE, SIDE).transpose(0, 1, 3, 2).copy())


def read_labels(path: Path, count: int) -> torch.Tensor:
    labels = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    if labels.size != count:
        raise UserError(f"{path} holds {labels.size} labels for {count} images")
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise UserError(f"{path}: labels must be 1..10")
    return torch.from_numpy(labels - 1)


def load_stl10_files(options: DataOptions, md5s: dict[str, str] | None | str = "official") -> ImageDataset:
    """`md5s='official'` checks the archive and the .bin files against torchvision's MD5s;
    tests with miniature files pass their own ({member or archive name: md5}), or None."""
    root = data_root(options.data_dir)
    url, archive_md5, member_md5s = official()
    expected = {ARCHIVE: archive_md5, **member_md5s} if md5s == "official" else md5s
    folder, archive = root / FOLDER, root / ARCHIVE
    if not all((folder / name).is_file() for name in MEMBERS):
        if not archive.is_file():
            if not options.download:
                raise UserError(f"stl10 not found: put {ARCHIVE} (or its extracted {FOLDER}/) in {root}, "
                                f"or pass download to fetch it from {url}", setting="download")
            download(url, archive, archive_md5)
        elif expected is not None:
            check_md5(archive, expected.get(ARCHIVE))
        extract_members(archive, folder)
    for name in MEMBERS[:4]:
        if expected is not None:
            check_md5(folder / name, expected.get(name))
    train_x = read_images(folder / "train_X.bin")
    test_x = read_images(folder / "test_X.bin")
    train_y = read_labels(folder / "train_y.bin", len(train_x))
    test_y = read_labels(folder / "test_y.bin", len(test_x))
    names = [line.strip() for line in (folder / "class_names.txt").read_text().splitlines() if line.strip()]
    if len(names) != 10:
        raise UserError(f"{folder / 'class_names.txt'} names {len(names)} classes, not 10")
    return make_dataset("stl10", train_x, train_y, test_x, test_y, names, **STL10_DEFAULTS.augmentation())


def _availability(options: DataOptions) -> str:
    root = data_root(options.data_dir)
    for candidate in (root / FOLDER, root / ARCHIVE):
        if candidate.exists():
            return f"found {candidate}"
    return f"not here: put {ARCHIVE} in {root} or train with `download`"


@register_dataset("stl10", "STL-10: 96x96 colour, 10 classes, 5k/8k labelled (ImageNet-like)", _availability,
                  shape=DataShape(96, 3, 10, 5000), defaults=STL10_DEFAULTS)
def load_stl10(options: DataOptions) -> ImageDataset:
    return load_stl10_files(options)

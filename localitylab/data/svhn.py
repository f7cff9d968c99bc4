"""SVHN (Street View House Numbers), cropped digits, from the official .mat files.

`train_32x32.mat` and `test_32x32.mat` in the data folder, as torchvision keeps them; each is
checked against the MD5 torchvision pins, and `download` fetches them from the source.
They are MATLAB 5 files read with scipy.io.loadmat, as torchvision reads them: a parser of
plain arrays, no unpickling. X is (32, 32, 3, N) uint8, y is (N, 1) with 10 for the digit 0.
The `extra` split (531k easier images) is not used, as in the usual train/test protocol.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from localitylab.data.files import check_md5, data_root, download
from localitylab.data.registry import DataDefaults, DataOptions, DataShape, ImageDataset, make_dataset, register_dataset
from localitylab.errors import UserError

SPLITS = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
# House numbers: a mirrored digit is not a digit, so no flips; shifts of 1/8 of the side.
SVHN_DEFAULTS = DataDefaults(batch_size=128, warmup_epochs=2, hflip=False, crop_padding=4)


def official() -> dict[str, tuple[str, str]]:
    """file name -> (url, md5), from torchvision."""
    from torchvision.datasets import SVHN

    return {SPLITS[split]: (url, md5) for split, (url, _, md5) in SVHN.split_list.items() if split in SPLITS}


def read_mat(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as err:  # noqa: BLE001 - whatever a foreign .mat file makes the parser raise
        raise UserError(f"{path} is not a readable MATLAB file: {err}") from None
    images, labels = mat.get("X"), mat.get("y")
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[:3] != (32, 32, 3):
        raise UserError(f"{path}: 'X' must be a (32, 32, 3, N) array")
    if not isinstance(labels, np.ndarray) or labels.size != images.shape[3]:
        raise UserError(f"{path}: 'y' must hold one label per image ({images.shape[3]})")
    labels = labels.astype(np.int64).reshape(-1)
    if labels.min(initial=1) < 1 or labels.max(initial=1) > 10:
        raise UserError(f"{path}: labels must be 1..10 (10 is the digit 0)")
    labels[labels == 10] = 0
    return torch.from_numpy(images.astype(np.uint8).transpose(3, 2, 0, 1).copy()), torch.from_numpy(labels)


def load_svhn_files(options: DataOptions, md5s: dict[str, str] | None | str = "official") -> ImageDataset:
    """`md5s='official'` checks the files against torchvision's MD5s; tests pass their own, or None."""
    root = data_root(options.data_dir)
    sources = official()
    expected = {name: md5 for name, (_, md5) in sources.items()} if md5s == "official" else md5s
    missing = [name for name in SPLITS.values() if not (root / name).is_file()]
    if missing:
        if not options.download:
            raise UserError(f"svhn not found: put {' and '.join(missing)} in {root}, or pass download to fetch "
                            f"{'them' if len(missing) > 1 else 'it'} from {sources[missing[0]][0].rsplit('/', 1)[0]}/",
                            setting="download")
        for name in missing:
            download(sources[name][0], root / name, sources[name][1])
    splits = {}
    for split, name in SPLITS.items():
        if expected is not None:
            check_md5(root / name, expected.get(name))
        splits[split] = read_mat(root / name)
    return make_dataset("svhn", *splits["train"], *splits["test"], [str(d) for d in range(10)],
                        **SVHN_DEFAULTS.augmentation())


def _availability(options: DataOptions) -> str:
    root = data_root(options.data_dir)
    if all((root / name).is_file() for name in SPLITS.values()):
        return f"found {root / SPLITS['train']}"
    return f"not here: put {' and '.join(SPLITS.values())} in {root} or train with `download`"


@register_dataset("svhn", "SVHN: 32x32 colour house-number digits, 10 classes, 73k/26k", _availability,
                  shape=DataShape(32, 3, 10, 73257), defaults=SVHN_DEFAULTS)
def load_svhn(options: DataOptions) -> ImageDataset:
    return load_svhn_files(options)

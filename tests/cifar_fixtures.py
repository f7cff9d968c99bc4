"""Miniature CIFAR archives in the exact official python format (pickled dicts of bytes
keys, protocol 2, data as (N, 3072) uint8 rows in R, G, B planes), written by the tests."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from localitylab.data.cifar import CIFAR10, CIFAR100


def _batch(rng, n, label_key, num_classes, extra=None):
    labels = [int(i % num_classes) for i in range(n)]
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    batch = {b"batch_label": b"testing batch", label_key: labels, b"data": data,
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    batch.update(extra or {})
    return batch


def write_cifar_archive(root: Path, variant: str = "cifar10", per_batch: int = 6, as_folder: bool = False,
                        seed: int = 0) -> tuple[Path, dict]:
    """Write a miniature archive (or extracted folder); return its path and the arrays written."""
    rng = np.random.default_rng(seed)
    members: dict[str, dict] = {}
    if variant == "cifar10":
        spec = CIFAR10
        for name in spec.train_members:
            members[name] = _batch(rng, per_batch, b"labels", 10)
        members[spec.test_member] = _batch(rng, per_batch, b"labels", 10)
        members[spec.meta_member] = {b"label_names": [f"class{i}".encode() for i in range(10)],
                                     b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    else:
        spec = CIFAR100
        coarse = {b"coarse_labels": [0] * per_batch}
        members["train"] = _batch(rng, per_batch * 2, b"fine_labels", 100, coarse | {b"coarse_labels": [0] * per_batch * 2})
        members["test"] = _batch(rng, per_batch, b"fine_labels", 100, coarse)
        members["meta"] = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                           b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}
    root.mkdir(parents=True, exist_ok=True)
    if as_folder:
        folder = root / spec.folder
        folder.mkdir()
        for name, content in members.items():
            (folder / name).write_bytes(pickle.dumps(content, protocol=2))
        return folder, members
    archive = root / spec.archive
    with tarfile.open(archive, "w:gz") as tar:
        for name, content in members.items():
            raw = pickle.dumps(content, protocol=2)
            info = tarfile.TarInfo(f"{spec.folder}/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return archive, members


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()

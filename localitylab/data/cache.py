"""A cache of decoded, resized images, so the second run on an image-file data set starts in
seconds instead of decoding every file again.

An entry is keyed by what the images were decoded from, as the loader lists it: every file's
path, size and modification time (or an archive's), the labels' source, the image size and
this module's format version. Change, add or remove a file and the key changes: the entry
is simply not found and a new one is written. An entry is one safetensors file (tensors and
a JSON header, nothing to unpickle), written to a temporary name and renamed, so a reader
never sees half an entry and two processes building the same one cannot corrupt it.

Where: $LOCALITYLAB_CACHE_DIR, else ~/.cache/localitylab/decoded. Safe to delete at any
time. `DataOptions(cache=False)` neither reads nor writes it. A cache that cannot be written warns
(`CacheNotWritten`) and the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from localitylab.io import atomic_path

# Bump when decoding changes what a cached entry would hold.
FORMAT_VERSION = 1


class CacheNotWritten(UserWarning):
    """The image cache could not be written; the run goes on without it."""


def cache_dir() -> Path:
    return Path(os.environ.get("LOCALITYLAB_CACHE_DIR", Path.home() / ".cache" / "localitylab" / "decoded"))


@dataclass
class DecodedSplits:
    """What an image-file loader produces: both splits as uint8 tensors, and the class names."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]

    def __post_init__(self) -> None:
        # Each split is grey only if all its images are (data/images.py); the two splits of
        # one data set must agree, so a grey split beside a colour one becomes RGB too.
        if self.train_images.shape[1] != self.test_images.shape[1]:
            chans = max(self.train_images.shape[1], self.test_images.shape[1])
            self.train_images = self.train_images.expand(-1, chans, -1, -1).contiguous()
            self.test_images = self.test_images.expand(-1, chans, -1, -1).contiguous()


def entry_path(kind: str, key: Any) -> Path:
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, kind, key], sort_keys=True, default=str).encode()).hexdigest()
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", kind).strip("-.")[:60] or "data"
    return cache_dir() / f"{label}-{digest[:32]}.safetensors"


def _read(path: Path) -> DecodedSplits | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        return DecodedSplits(tensors["train_images"], tensors["train_labels"], tensors["test_images"],
                             tensors["test_labels"], json.loads(meta["class_names"]))
    except Exception:  # noqa: BLE001 - a damaged entry is a cache miss, rebuilt below
        return None


def _write(path: Path, data: DecodedSplits) -> None:
    from safetensors.torch import save_file

    tensors = {"train_images": data.train_images.contiguous(), "train_labels": data.train_labels.contiguous(),
               "test_images": data.test_images.contiguous(), "test_labels": data.test_labels.contiguous()}
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"class_names": json.dumps(data.class_names),
                                                   "format_version": str(FORMAT_VERSION)})
    except Exception as err:  # noqa: BLE001 - a cache that cannot be written must not stop a run
        warnings.warn(f"could not write the image cache {path}: {err}", CacheNotWritten, stacklevel=2)


def cached_decode(kind: str, key: Any, build: Callable[[], DecodedSplits], enabled: bool = True,
                  info: dict | None = None) -> DecodedSplits:
    """`build()`'s result, from the cache when an entry for (kind, key) exists.

    `info`, when given, is filled with {'path', 'hit'}: where the entry is, and whether it
    was read rather than built."""
    if not enabled:
        if info is not None:
            info.update(path=None, hit=False)
        return build()
    path = entry_path(kind, key)
    if path.is_file():
        found = _read(path)
        if found is not None:
            if info is not None:
                info.update(path=str(path), hit=True)
            return found
    data = build()
    _write(path, data)
    if info is not None:
        info.update(path=str(path), hit=False)
    return data

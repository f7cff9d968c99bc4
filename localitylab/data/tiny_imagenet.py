"""Tiny-ImageNet (Stanford CS231n): 200 ImageNet classes at 64x64, 100,000 training and
10,000 validation images.

DATA_DIR/tiny-imagenet-200.zip as published (read in place, nothing extracted) or its
extracted DATA_DIR/tiny-imagenet-200/. The official layout: `wnids.txt` (the 200 classes),
`words.txt` (names of every WordNet id), `train/<wnid>/images/<wnid>_<k>.JPEG`,
`val/images/val_<k>.JPEG` with `val/val_annotations.txt` (file, wnid, box), and an unlabelled
`test/`. The validation images are the test split, as usual (the test labels were never
published). Classes are the sorted WordNet ids (ImageFolder's order), named by the first
synonym in words.txt. 64x64 natively; `img_size` resizes. Decoded images are cached.

The source publishes no checksum, so `download` does not fetch it: the error says where
to get the file and where to put it.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import torch

from localitylab.data.cache import DecodedSplits, cached_decode
from localitylab.data.files import data_root, file_stamp
from localitylab.data.imagenet import synset_names
from localitylab.data.images import decode_images
from localitylab.data.registry import DataDefaults, DataOptions, DataShape, ImageDataset, make_dataset, register_dataset
from localitylab.errors import UserError

FOLDER = "tiny-imagenet-200"
ARCHIVE = "tiny-imagenet-200.zip"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
NATIVE_SIZE = 64
WNID = re.compile(r"^n\d{8}$")
# Natural images: flips, and shifts of 1/8 of the side.
TINY_DEFAULTS = DataDefaults(batch_size=128, warmup_epochs=5, hflip=True, crop_padding=None)


class _Tree:
    """The data set's files, from the extracted folder or inside the zip, by relative path."""

    def __init__(self, root: Path):
        self.folder = root / FOLDER if (root / FOLDER).is_dir() else None
        self.zip = None
        if self.folder is None:
            archive = root / ARCHIVE
            try:
                self.zip = zipfile.ZipFile(archive)
            except FileNotFoundError:
                raise  # the caller says what to fetch
            except (zipfile.BadZipFile, OSError) as err:
                raise UserError(f"{archive} is not a readable zip file: {err}") from None
            self.archive = archive
            self.names = {info.filename for info in self.zip.infolist() if not info.is_dir()}

    def where(self, rel: str) -> str:
        return str(self.folder / rel) if self.folder else f"{self.archive}:{FOLDER}/{rel}"

    def text(self, rel: str) -> str:
        try:
            if self.folder:
                return (self.folder / rel).read_text(encoding="utf-8")
            return self.zip.read(f"{FOLDER}/{rel}").decode("utf-8")
        except (KeyError, FileNotFoundError):
            raise UserError(f"{self.where(rel)} is missing: not a complete {ARCHIVE}") from None
        except (UnicodeDecodeError, zipfile.BadZipFile) as err:
            raise UserError(f"{self.where(rel)} cannot be read as text: {err}") from None

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()

    def images(self, rel_folder: str) -> list[str]:
        """Relative paths of the .JPEG files in one folder, sorted."""
        if self.folder:
            folder = self.folder / rel_folder
            found = [f"{rel_folder}/{p.name}" for p in folder.iterdir()] if folder.is_dir() else []
        else:
            prefix = f"{FOLDER}/{rel_folder}/"
            found = [n[len(FOLDER) + 1:] for n in self.names if n.startswith(prefix) and "/" not in n[len(prefix):]]
        return sorted(p for p in found if p.lower().endswith((".jpeg", ".jpg")))

    def source(self, rel: str):
        if self.folder:
            return str(self.folder / rel)
        try:
            return self.zip.read(f"{FOLDER}/{rel}")
        except KeyError:
            raise UserError(f"{self.where(rel)} is missing") from None
        except (zipfile.BadZipFile, OSError) as err:
            raise UserError(f"{self.where(rel)} cannot be read: {err}") from None

    def stamp(self, rels: list[str]) -> list:
        if self.folder:
            return [file_stamp(self.folder / rel) for rel in rels]
        return [file_stamp(self.archive)]


def load_tiny_imagenet_files(options: DataOptions) -> ImageDataset:
    root = data_root(options.data_dir)
    tree = _open_tree(root, options)
    try:
        return _load(tree, root, options)
    finally:
        tree.close()


def _open_tree(root: Path, options: DataOptions) -> _Tree:
    try:
        return _Tree(root)
    except FileNotFoundError:
        if options.download:
            raise UserError(f"tiny-imagenet: the source publishes no checksum, so localitylab does not download it; "
                            f"fetch {URL} and put {ARCHIVE} (or its extracted {FOLDER}/) in {root}") from None
        raise UserError(f"tiny-imagenet not found: put {ARCHIVE} (or its extracted {FOLDER}/) in {root}; "
                        f"it is at {URL}") from None


def _load(tree: _Tree, root: Path, options: DataOptions) -> ImageDataset:
    wnids = sorted({line.strip() for line in tree.text("wnids.txt").splitlines() if line.strip()})
    if not wnids or not all(WNID.match(w) for w in wnids):
        raise UserError(f"{tree.where('wnids.txt')} must list WordNet ids (n########), one a line")
    index = {wnid: i for i, wnid in enumerate(wnids)}
    words = dict(line.split("\t", 1) for line in tree.text("words.txt").splitlines() if "\t" in line)
    train = [(rel, index[wnid]) for wnid in wnids for rel in tree.images(f"train/{wnid}/images")]
    val = []
    for number, line in enumerate(tree.text("val/val_annotations.txt").splitlines(), start=1):
        fields = line.split("\t")
        if not line.strip():
            continue
        if len(fields) < 2 or fields[1] not in index:
            raise UserError(f"{tree.where('val/val_annotations.txt')} line {number}: expected "
                            f"'<file>\\t<wnid>\\t...' with one of the {len(wnids)} wnids, got {line[:60]!r}")
        val.append((f"val/images/{fields[0]}", index[fields[1]]))
    if not train or not val:
        raise UserError(f"{root}: tiny-imagenet has no {'training' if not train else 'validation'} images")
    size = options.img_size or NATIVE_SIZE

    def decode(samples: list[tuple[str, int]], split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images = decode_images(((tree.where(rel), tree.source(rel)) for rel, _ in samples), len(samples), size,
                               f"tiny-imagenet {split}")
        return images, torch.tensor([label for _, label in samples], dtype=torch.long)

    def build() -> DecodedSplits:
        return DecodedSplits(*decode(train, "train"), *decode(val, "val"), synset_names(wnids, words))

    key = {"size": size, "labels": [train, val], "files": tree.stamp([rel for rel, _ in train + val])}
    cache: dict = {}
    data = cached_decode("tiny-imagenet", key, build, enabled=options.cache, info=cache)
    dataset = make_dataset("tiny-imagenet", data.train_images, data.train_labels, data.test_images, data.test_labels,
                           data.class_names, **TINY_DEFAULTS.augmentation())
    dataset.extra["cache"] = cache
    return dataset


def _availability(options: DataOptions) -> str:
    root = data_root(options.data_dir)
    for candidate in (root / FOLDER, root / ARCHIVE):
        if candidate.exists():
            return f"found {candidate}"
    return f"not here: fetch {URL} (no checksum is published) into {root}"


@register_dataset("tiny-imagenet", "Tiny-ImageNet: 64x64 colour, 200 ImageNet classes, 100k/10k (`img_size` resizes)",
                  _availability, resizable=True, shape=DataShape(64, 3, 200, 100000),
                  defaults=TINY_DEFAULTS)
def load_tiny_imagenet(options: DataOptions) -> ImageDataset:
    return load_tiny_imagenet_files(options)

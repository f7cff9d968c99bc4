"""Miniature data sets in the exact official formats, written by the tests (no download).

Each writer returns what it wrote, so a test can check that the loader gives back the same
images, in the same order, with the same labels. Image-file sets (Tiny-ImageNet, ImageNet)
are JPEGs of one flat colour per image, chosen from the label: JPEG keeps a flat colour to
within a few levels, so the colour says which label an image was written with.
"""

from __future__ import annotations

import functools
import gzip
import io
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file: 0, 0, type 0x08 (unsigned byte), the number of dimensions, the dimensions
    as big-endian 32-bit integers, then the values."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_dataset(folder: Path, n_train: int = 12, n_test: int = 6, gz: bool = True, seed: int = 0) -> dict:
    """The four MNIST-format files in `folder` (gzipped as published, or extracted)."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": ((np.arange(n_test) * 3) % 10).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        raw = idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return arrays


def write_svhn(root: Path, n_train: int = 10, n_test: int = 5, seed: int = 0) -> dict:
    """train_32x32.mat and test_32x32.mat as published: MATLAB 5 files with X (32, 32, 3, N)
    uint8 and y (N, 1) uint8 in 1..10, where 10 is the digit 0."""
    import scipy.io

    rng = np.random.default_rng(seed)
    written = {}
    root.mkdir(parents=True, exist_ok=True)
    for name, count in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        images = rng.integers(0, 256, (count, 3, 32, 32), dtype=np.uint8)
        digits = np.arange(count) % 10
        y = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(-1, 1)
        scipy.io.savemat(root / name, {"X": images.transpose(2, 3, 1, 0), "y": y})
        written[name] = (images, digits)
    return written


STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def write_stl10(root: Path, n_train: int = 6, n_test: int = 4, as_archive: bool = False, seed: int = 0) -> dict:
    """stl10_binary/{train,test}_{X,y}.bin and class_names.txt as published: images as raw
    uint8, each stored column-major (3, 96, 96 transposed), labels 1..10; or the same in
    stl10_binary.tar.gz, with an unlabelled file the loader must skip."""
    rng = np.random.default_rng(seed)
    images = {"train": rng.integers(0, 256, (n_train, 3, 96, 96), dtype=np.uint8),
              "test": rng.integers(0, 256, (n_test, 3, 96, 96), dtype=np.uint8)}
    labels = {"train": np.arange(n_train) % 10, "test": (np.arange(n_test) + 5) % 10}
    members = {}
    for split in ("train", "test"):
        members[f"{split}_X.bin"] = np.ascontiguousarray(images[split].transpose(0, 1, 3, 2)).tobytes()
        members[f"{split}_y.bin"] = (labels[split] + 1).astype(np.uint8).tobytes()
    members["class_names.txt"] = ("\n".join(STL10_CLASSES) + "\n").encode()
    members["unlabeled_X.bin"] = rng.integers(0, 256, 3 * 96 * 96, dtype=np.uint8).tobytes()
    root.mkdir(parents=True, exist_ok=True)
    if as_archive:
        with tarfile.open(root / "stl10_binary.tar.gz", "w:gz") as tar:
            for name, raw in members.items():
                info = tarfile.TarInfo(f"stl10_binary/{name}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    else:
        (root / "stl10_binary").mkdir()
        for name, raw in members.items():
            (root / "stl10_binary" / name).write_bytes(raw)
    return {"images": images, "labels": labels}


def colour_of(label: int) -> tuple[int, int, int]:
    return (20 + 40 * (label % 6), 200 - 30 * (label // 6), 90 + 17 * label % 160)


def jpeg_bytes(label: int, size: tuple[int, int] = (64, 64), grey: bool = False) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    image = Image.new("RGB", size, colour_of(label))
    (image.convert("L") if grey else image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


WNIDS = ["n01443537", "n01629819", "n02085620"]  # goldfish, European fire salamander, Chihuahua
WORDS = {"n01443537": "goldfish, Carassius auratus", "n01629819": "European fire salamander, Salamandra salamandra",
         "n02085620": "Chihuahua", "n00001740": "entity"}


def write_tiny_imagenet(root: Path, per_class: int = 2, as_zip: bool = False) -> dict:
    """tiny-imagenet-200/ as published (or zipped): wnids.txt (not sorted), words.txt (more
    ids than the classes), train/<wnid>/images/<wnid>_<k>.JPEG with <wnid>_boxes.txt,
    val/images/val_<k>.JPEG with val/val_annotations.txt, and an unlabelled test/."""
    files: dict[str, bytes] = {}
    files["wnids.txt"] = ("\n".join(reversed(WNIDS)) + "\n").encode()
    files["words.txt"] = "".join(f"{w}\t{name}\n" for w, name in WORDS.items()).encode()
    sorted_wnids = sorted(WNIDS)
    train_labels = []
    for wnid in WNIDS:
        label = sorted_wnids.index(wnid)
        files[f"train/{wnid}/{wnid}_boxes.txt"] = b"".join(f"{wnid}_{k}.JPEG\t0\t0\t63\t63\n".encode()
                                                           for k in range(per_class))
        for k in range(per_class):
            files[f"train/{wnid}/images/{wnid}_{k}.JPEG"] = jpeg_bytes(label, grey=(k == 1))
            train_labels.append(label)
    annotations, val_labels = [], []
    for k in range(len(WNIDS) * 2):
        wnid = WNIDS[(k * 2) % len(WNIDS)]
        label = sorted_wnids.index(wnid)
        files[f"val/images/val_{k}.JPEG"] = jpeg_bytes(label)
        annotations.append(f"val_{k}.JPEG\t{wnid}\t1\t2\t60\t61\n")
        val_labels.append(label)
    files["val/val_annotations.txt"] = "".join(annotations).encode()
    files["test/images/test_0.JPEG"] = jpeg_bytes(0)
    root.mkdir(parents=True, exist_ok=True)
    if as_zip:
        with zipfile.ZipFile(root / "tiny-imagenet-200.zip", "w") as archive:
            for rel, raw in files.items():
                archive.writestr(f"tiny-imagenet-200/{rel}", raw)
    else:
        for rel, raw in files.items():
            path = root / "tiny-imagenet-200" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(raw)
    return {"train_labels": train_labels, "val_labels": val_labels, "classes": sorted_wnids}


def _add(tar: tarfile.TarFile, name: str, raw: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(raw)
    tar.addfile(info, io.BytesIO(raw))


def write_imagenet_devkit(path: Path, wnids: list[str], per_class: int, val_wnids: list[str]) -> None:
    """ILSVRC2012_devkit_t12.tar.gz with data/meta.mat (the synsets struct array: leaves with
    ILSVRC2012_ID 1..K in an order that is not the sorted WNIDs, plus one inner node) and
    data/ILSVRC2012_validation_ground_truth.txt (one ILSVRC2012_ID a line)."""
    import scipy.io

    ids = {wnid: i + 1 for i, wnid in enumerate(reversed(wnids))}  # ILSVRC ids do not follow the sorted order
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    synsets = np.zeros((len(wnids) + 1, 1), dtype=[(f, object) for f in fields])
    for row, wnid in enumerate(wnids):
        synsets[row, 0] = (ids[wnid], wnid, WORDS[wnid], "a gloss", 0, np.zeros((1, 0)), 0, per_class)
    synsets[len(wnids), 0] = (len(wnids) + 1, "n00001740", "entity", "the root", len(wnids),
                              np.arange(1, len(wnids) + 1, dtype=np.float64), 19, 0)
    meta = io.BytesIO()
    scipy.io.savemat(meta, {"synsets": synsets})
    truth = "".join(f"{ids[w]}\n" for w in val_wnids).encode()
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "ILSVRC2012_devkit_t12/data/meta.mat", meta.getvalue())
        _add(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth)
        _add(tar, "ILSVRC2012_devkit_t12/readme.txt", b"devkit\n")


def write_imagenet(root: Path, per_class: int = 2, extracted: bool = False) -> dict:
    """The three ILSVRC 2012 archives as published: the devkit, ILSVRC2012_img_train.tar (one
    <wnid>.tar of JPEGs per class) and ILSVRC2012_img_val.tar (flat ILSVRC2012_val_<n>.JPEG,
    labelled by the devkit); or the extracted train/<wnid>/ and val/<wnid>/ folders
    torchvision writes, with the devkit beside them."""
    sorted_wnids = sorted(WNIDS)
    val_wnids = [WNIDS[(k * 2) % len(WNIDS)] for k in range(len(WNIDS) * 2)]
    root.mkdir(parents=True, exist_ok=True)
    write_imagenet_devkit(root / "ILSVRC2012_devkit_t12.tar.gz", WNIDS, per_class, val_wnids)
    train_labels = []
    if extracted:
        for wnid in WNIDS:
            (root / "train" / wnid).mkdir(parents=True)
            for k in range(per_class):
                (root / "train" / wnid / f"{wnid}_{k}.JPEG").write_bytes(jpeg_bytes(sorted_wnids.index(wnid)))
        for n, wnid in enumerate(val_wnids, start=1):
            (root / "val" / wnid).mkdir(parents=True, exist_ok=True)
            (root / "val" / wnid / f"ILSVRC2012_val_{n:08d}.JPEG").write_bytes(jpeg_bytes(sorted_wnids.index(wnid)))
        train_labels = [sorted_wnids.index(w) for w in sorted_wnids for _ in range(per_class)]
        val_labels = sorted(sorted_wnids.index(w) for w in val_wnids)
    else:
        with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as train:
            for wnid in WNIDS:
                inner = io.BytesIO()
                with tarfile.open(fileobj=inner, mode="w") as class_tar:
                    for k in range(per_class):
                        _add(class_tar, f"{wnid}_{k}.JPEG", jpeg_bytes(sorted_wnids.index(wnid), size=(80, 60)))
                        train_labels.append(sorted_wnids.index(wnid))
                _add(train, f"{wnid}.tar", inner.getvalue())
        with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as val:
            for n, wnid in enumerate(val_wnids, start=1):
                _add(val, f"ILSVRC2012_val_{n:08d}.JPEG", jpeg_bytes(sorted_wnids.index(wnid), size=(50, 70)))
        val_labels = [sorted_wnids.index(w) for w in val_wnids]
    return {"train_labels": train_labels, "val_labels": val_labels, "classes": sorted_wnids}


@functools.lru_cache(maxsize=1)
def bomb_png() -> bytes:
    """A valid PNG of 40,000 x 40,000 black pixels (1.6 billion; one bit each) that is ~190 KB
    on disk: decoded, it would take 1.6 GB as greyscale bytes, 4.8 GB as RGB. Made once a session."""
    width = height = 40_000
    rows = (b"\x00" * (1 + width // 8)) * 1000  # filter byte 0, then the row's bits
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(rows) for _ in range(height // 1000)) + packer.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def truncated_jpeg() -> bytes:
    """A 32x32 JPEG cut off half-way through its compressed data."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]

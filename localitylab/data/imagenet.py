"""ImageNet-1k (ILSVRC 2012): 1,000 classes, 1,281,167 training and 50,000 validation images,
resized to `img_size` (required: the whole set is held in memory, as every data set here;
the PiT paper's ImageNet runs are at low resolution).

Looked for in DATA_DIR/imagenet/, then in DATA_DIR itself, in either official form:

- the archives as image-net.org publishes them, read in place in one streaming pass (nothing
  extracted) and checked against the MD5s torchvision pins while they are read:
  `ILSVRC2012_img_train.tar` (one tar per class, `<wnid>.tar`, of JPEGs),
  `ILSVRC2012_img_val.tar` (50,000 JPEGs, `ILSVRC2012_val_<8 digits>.JPEG`) and
  `ILSVRC2012_devkit_t12.tar.gz` (`data/meta.mat`: the synsets, read with scipy.io.loadmat
  as torchvision reads it; `data/ILSVRC2012_validation_ground_truth.txt`: the validation
  labels as ILSVRC2012_IDs);
- the extracted layout torchvision's ImageNet class writes, `train/<wnid>/*.JPEG` and
  `val/<wnid>/*.JPEG`, with the devkit beside it for the class names (without it the
  classes are named by their WordNet ids).

Classes are the sorted WordNet ids, the order every PyTorch ImageNet model uses (class 0 is
n01440764, tench). Decoded images are cached: the first run pays for decoding once.
ImageNet is not downloaded (image-net.org asks each user to register): the error says
which files to fetch and where to put them.
"""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import numpy as np
import torch

from localitylab.data.cache import DecodedSplits, cached_decode
from localitylab.data.files import HashingReader, data_root, file_stamp
from localitylab.data.folder import decode_samples, list_image_folder
from localitylab.data.images import decode_images
from localitylab.data.registry import DataDefaults, DataOptions, ImageDataset, make_dataset, register_dataset
from localitylab.errors import UserError

TRAIN_ARCHIVE = "ILSVRC2012_img_train.tar"
VAL_ARCHIVE = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
DEVKIT_META = "ILSVRC2012_devkit_t12/data/meta.mat"
DEVKIT_VAL_LABELS = "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"
WNID = re.compile(r"^n\d{8}$")
VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$")
WHERE_TO_GET = "https://image-net.org/download-images (an account is needed)"
# Natural images: flips, and shifts of 1/8 of the side.
IMAGENET_DEFAULTS = DataDefaults(batch_size=128, warmup_epochs=5, hflip=True, crop_padding=None)


def official_md5s() -> dict[str, str]:
    from torchvision.datasets.imagenet import ARCHIVE_META

    return {name: md5 for name, md5 in ARCHIVE_META.values()}


def synset_names(wnids: list[str], words: dict[str, str]) -> list[str]:
    """Each class named by the first synonym of its WordNet id ('tench, Tinca tinca' -> 'tench');
    a name two classes share (ImageNet has two 'crane's) gets its id added."""
    first = [words.get(wnid, wnid).split(",")[0].strip() or wnid for wnid in wnids]
    counts = {name: first.count(name) for name in first}
    return [name if counts[name] == 1 else f"{name} ({wnid})" for name, wnid in zip(first, wnids)]


class Devkit:
    """The synsets and validation labels of ILSVRC2012_devkit_t12.tar.gz."""

    def __init__(self, path: Path):
        self.path = path
        members = self._members(path, (DEVKIT_META, DEVKIT_VAL_LABELS))
        import scipy.io

        try:
            synsets = scipy.io.loadmat(io.BytesIO(members[DEVKIT_META]), squeeze_me=True)["synsets"]
            leaves = synsets[np.asarray(synsets["num_children"], dtype=np.int64) == 0]
            ids = [int(i) for i in leaves["ILSVRC2012_ID"]]
            wnids = [str(w) for w in leaves["WNID"]]
            words = [str(w) for w in leaves["words"]]
            counts = [int(n) for n in leaves["num_train_images"]]
        except Exception as err:  # noqa: BLE001 - whatever a foreign .mat file makes the parser raise
            raise UserError(f"{path}:{DEVKIT_META} is not the devkit's synset table: {err}") from None
        self.id_to_wnid = dict(zip(ids, wnids))
        self.words = dict(zip(wnids, words))
        self.train_counts = dict(zip(wnids, counts))
        try:
            self.val_ids = [int(line) for line in members[DEVKIT_VAL_LABELS].decode().split()]
        except (ValueError, UnicodeDecodeError) as err:
            raise UserError(f"{path}:{DEVKIT_VAL_LABELS} must hold one ILSVRC2012_ID a line: {err}") from None
        unknown = set(self.val_ids) - set(self.id_to_wnid)
        if unknown:
            raise UserError(f"{path}: validation label {min(unknown)} is not a leaf synset of meta.mat")

    @staticmethod
    def _members(path: Path, names: tuple[str, ...]) -> dict[str, bytes]:
        found = {}
        try:
            with tarfile.open(path, "r:gz") as tar:
                for name in names:
                    handle = tar.extractfile(name)
                    if handle is None:
                        raise KeyError(name)
                    found[name] = handle.read()
        except KeyError as err:
            raise UserError(f"{path} has no member {err.args[0]}") from None
        except (tarfile.TarError, OSError, EOFError) as err:
            raise UserError(f"{path} is not a readable tar.gz archive: {err}") from None
        return found

    @property
    def wnids(self) -> list[str]:
        return sorted(self.id_to_wnid.values())


def _stream(path: Path, md5: str | None):
    """Open a tar for one sequential pass; returns (tar, hashing reader, file)."""
    handle = open(path, "rb")
    reader = HashingReader(handle)
    try:
        return tarfile.open(fileobj=reader, mode="r|"), reader, handle
    except (tarfile.TarError, OSError, EOFError) as err:
        handle.close()
        raise UserError(f"{path} is not a readable tar archive: {err}") from None


def _finish(path: Path, reader: HashingReader, handle, md5: str | None) -> None:
    try:
        got = reader.finish()
    finally:
        handle.close()
    if md5 is not None and got != md5:
        raise UserError(f"{path} has MD5 {got}, expected {md5}: the file is damaged or not the official archive")


def _train_from_archive(path: Path, devkit: Devkit, index: dict[str, int], size: int, md5: str | None):
    labels: list[int] = []

    def sources():
        tar, reader, handle = _stream(path, md5)
        try:
            for member in tar:
                wnid = member.name[:-4] if member.name.endswith(".tar") else ""
                if not member.isfile() or wnid not in index:
                    raise UserError(f"{path}: unexpected member {member.name!r}; expected <wnid>.tar for the "
                                    f"devkit's 1,000 classes")
                inner = tarfile.open(fileobj=tar.extractfile(member), mode="r|")
                for image in inner:
                    if image.isfile():
                        labels.append(index[wnid])
                        yield f"{path}:{member.name}/{image.name}", inner.extractfile(image).read()
        except (tarfile.TarError, OSError, EOFError) as err:
            raise UserError(f"{path} is not a readable tar archive: {err}") from None
        _finish(path, reader, handle, md5)

    count = sum(devkit.train_counts[w] for w in index)
    images = decode_images(sources(), count, size, f"imagenet train ({path.name})")
    return images, torch.tensor(labels, dtype=torch.long)


def _val_from_archive(path: Path, devkit: Devkit, index: dict[str, int], size: int, md5: str | None):
    labels: list[int] = []

    def sources():
        tar, reader, handle = _stream(path, md5)
        try:
            for member in tar:
                match = VAL_NAME.match(member.name)
                if not member.isfile() or not match or not 1 <= int(match[1]) <= len(devkit.val_ids):
                    raise UserError(f"{path}: unexpected member {member.name!r}; expected ILSVRC2012_val_<n>.JPEG "
                                    f"for n = 1..{len(devkit.val_ids)}")
                labels.append(index[devkit.id_to_wnid[devkit.val_ids[int(match[1]) - 1]]])
                yield f"{path}:{member.name}", tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as err:
            raise UserError(f"{path} is not a readable tar archive: {err}") from None
        _finish(path, reader, handle, md5)

    images = decode_images(sources(), len(devkit.val_ids), size, f"imagenet val ({path.name})")
    return images, torch.tensor(labels, dtype=torch.long)


def _find_root(root: Path) -> Path | None:
    for candidate in (root / "imagenet", root):
        if (candidate / "train").is_dir() and (candidate / "val").is_dir():
            return candidate
        if all((candidate / name).is_file() for name in (TRAIN_ARCHIVE, VAL_ARCHIVE, DEVKIT)):
            return candidate
    return None


def load_imagenet_files(options: DataOptions, md5s: dict[str, str] | None | str = "official") -> ImageDataset:
    """`md5s='official'` checks the archives against torchvision's MD5s as they are read;
    tests with miniature archives pass their own ({archive name: md5}), or None."""
    data_dir = data_root(options.data_dir)
    if not options.img_size:
        raise UserError("imagenet needs img_size: the whole set is held in memory as uint8 (the 1.28M training "
                        "images are 3.7 GiB at 32x32, 14.7 GiB at 64x64)", setting="img_size")
    root = _find_root(data_dir)
    if root is None:
        fetch = f"{TRAIN_ARCHIVE}, {VAL_ARCHIVE} and {DEVKIT} from {WHERE_TO_GET}"
        if options.download:
            raise UserError(f"imagenet cannot be downloaded for you: fetch {fetch} and put them in {data_dir / 'imagenet'}")
        raise UserError(f"imagenet not found: put {fetch} (or the extracted train/<wnid>/ and val/<wnid>/ folders) "
                        f"in {data_dir / 'imagenet'}")
    expected = official_md5s() if md5s == "official" else (md5s or {})
    size = options.img_size
    devkit_path = root / DEVKIT
    cache: dict = {}
    if (root / "train").is_dir() and (root / "val").is_dir():
        train_classes, train_samples = list_image_folder(root / "train")
        val_classes, val_samples = list_image_folder(root / "val")
        if train_classes != val_classes:
            raise UserError(f"{root}: train/ and val/ have different class folders")
        devkit = Devkit(devkit_path) if devkit_path.is_file() else None
        names = synset_names(train_classes, devkit.words) if devkit else list(train_classes)

        def build() -> DecodedSplits:
            return DecodedSplits(*decode_samples(train_samples, size, "imagenet train"),
                                 *decode_samples(val_samples, size, "imagenet val"), names)

        key = {"size": size, "names": names,
               "files": [[*file_stamp(Path(p)), label] for p, label in train_samples + val_samples]}
    else:
        devkit = Devkit(devkit_path)
        wnids = devkit.wnids
        index = {wnid: i for i, wnid in enumerate(wnids)}

        def build() -> DecodedSplits:
            train = _train_from_archive(root / TRAIN_ARCHIVE, devkit, index, size, expected.get(TRAIN_ARCHIVE))
            val = _val_from_archive(root / VAL_ARCHIVE, devkit, index, size, expected.get(VAL_ARCHIVE))
            return DecodedSplits(*train, *val, synset_names(wnids, devkit.words))

        key = {"size": size, "files": [file_stamp(root / n) for n in (TRAIN_ARCHIVE, VAL_ARCHIVE, DEVKIT)]}
    data = cached_decode("imagenet", key, build, enabled=options.cache, info=cache)
    dataset = make_dataset("imagenet", data.train_images, data.train_labels, data.test_images, data.test_labels,
                           data.class_names, **IMAGENET_DEFAULTS.augmentation())
    dataset.extra["cache"] = cache
    return dataset


def _availability(options: DataOptions) -> str:
    root = _find_root(data_root(options.data_dir))
    if root is not None:
        return f"found {root}"
    return f"not here: fetch {TRAIN_ARCHIVE}, {VAL_ARCHIVE}, {DEVKIT} from image-net.org into " \
           f"{data_root(options.data_dir) / 'imagenet'}"


@register_dataset("imagenet", "ImageNet-1k (ILSVRC 2012): 1,000 classes, 1.28M/50k, resized to `img_size`", _availability,
                  resizable=True, defaults=IMAGENET_DEFAULTS)
def load_imagenet(options: DataOptions) -> ImageDataset:
    return load_imagenet_files(options)

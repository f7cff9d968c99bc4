"""The standard benchmarks on miniatures in their official formats: MNIST, Fashion-MNIST, SVHN,
STL-10, Tiny-ImageNet, ImageNet; their recipe defaults; and what each says when it is missing."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from localitylab.data import DataOptions, load_dataset
from localitylab.data.registry import dataset_defaults, dataset_entries, known_shape, takes_img_size
from localitylab.errors import UserError
from tests.cifar_fixtures import md5
from tests.dataset_fixtures import (STL10_CLASSES, colour_of, write_idx_dataset, write_imagenet, write_stl10,
                                    write_svhn, write_tiny_imagenet)

# --- MNIST and Fashion-MNIST ------------------------------------------------------------------


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST/raw"), ("fashion-mnist", "FashionMNIST/raw")])
@pytest.mark.parametrize("gz", [True, False])
def test_idx_datasets_round_trip(tmp_path, name, folder, gz):
    from localitylab.data.mnist import load_idx_variant

    written = write_idx_dataset(tmp_path / folder, gz=gz)
    digests = {p.name: md5(p) for p in (tmp_path / folder).iterdir()}
    data = load_idx_variant(name, DataOptions(data_dir=tmp_path), md5s=digests)
    assert data.train_images.shape == (12, 1, 28, 28) and data.train_images.dtype == torch.uint8
    assert torch.equal(data.train_images[:, 0], torch.from_numpy(written["train-images-idx3-ubyte"]))
    assert torch.equal(data.test_images[:, 0], torch.from_numpy(written["t10k-images-idx3-ubyte"]))
    assert data.train_labels.tolist() == written["train-labels-idx1-ubyte"].tolist()
    assert data.test_labels.tolist() == written["t10k-labels-idx1-ubyte"].tolist()
    assert data.info.num_classes == 10 and data.info.in_chans == 1 and data.info.img_size == 28
    assert data.info.hflip == (name == "fashion-mnist") and data.info.crop_padding == 2
    if name == "fashion-mnist":
        assert data.info.class_names[9] == "Ankle boot"


@pytest.mark.parametrize("level", [1, 9])
def test_idx_files_are_read_by_content_at_any_gzip_level(tmp_path, level):
    # Recompressed copies (a Linux distribution's, at another gzip level, so another MD5) and
    # files a user wrote are the same data: read by their IDX content, not refused as damaged.
    written = write_idx_dataset(tmp_path / "FashionMNIST/raw", gz=False)
    for path in (tmp_path / "FashionMNIST/raw").iterdir():
        packed = path.with_name(path.name + ".gz")
        packed.write_bytes(gzip.compress(path.read_bytes(), compresslevel=level))
        path.unlink()
    data = load_dataset("fashion-mnist", DataOptions(data_dir=tmp_path))
    assert torch.equal(data.train_images[:, 0], torch.from_numpy(written["train-images-idx3-ubyte"]))
    assert data.test_labels.tolist() == written["t10k-labels-idx1-ubyte"].tolist()


def test_idx_truncated_gzip_is_one_line(tmp_path):
    folder = tmp_path / "MNIST/raw"
    write_idx_dataset(folder)
    packed = folder / "train-images-idx3-ubyte.gz"
    packed.write_bytes(packed.read_bytes()[:200])
    with pytest.raises(UserError, match="train-images-idx3-ubyte.gz is not a readable gzip file") as err:
        load_dataset("mnist", DataOptions(data_dir=tmp_path))
    assert "\n" not in str(err.value)


def test_idx_images_of_another_size_are_refused(tmp_path):
    from tests.dataset_fixtures import idx_bytes

    folder = tmp_path / "MNIST/raw"
    write_idx_dataset(folder)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((12, 14, 14), np.uint8))))
    with pytest.raises(UserError, match="are 14x14; mnist images are 28x28"):
        load_dataset("mnist", DataOptions(data_dir=tmp_path))


def test_idx_damaged_files_are_one_line(tmp_path):
    from localitylab.data.mnist import load_idx_variant

    folder = tmp_path / "MNIST/raw"
    write_idx_dataset(folder, gz=False)
    raw = (folder / "t10k-images-idx3-ubyte").read_bytes()
    (folder / "t10k-images-idx3-ubyte").write_bytes(raw[:-5])  # cut short
    with pytest.raises(UserError, match="holds 4699 values; its header says 6x28x28"):
        load_idx_variant("mnist", DataOptions(data_dir=tmp_path), md5s=None)
    (folder / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03" + raw[4:])  # float32, not bytes
    with pytest.raises(UserError, match="expected unsigned bytes"):
        load_idx_variant("mnist", DataOptions(data_dir=tmp_path), md5s=None)


def test_idx_missing_names_the_files_and_the_folder(tmp_path):
    write_idx_dataset(tmp_path / "MNIST/raw")
    (tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match=r"put t10k-labels-idx1-ubyte.gz in .*MNIST/raw, or pass download"):
        load_dataset("mnist", DataOptions(data_dir=tmp_path))


def test_idx_download_checks_each_file_and_keeps_nothing_bad(tmp_path, monkeypatch):
    # --download fetches the missing files from torchvision's mirrors; a file whose MD5 is
    # not the pinned one is not kept, and the error names the mirror.
    import torchvision.datasets

    server = tmp_path / "server"
    write_idx_dataset(server)
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [server.as_uri() + "/"])
    with pytest.raises(UserError, match="has MD5 .*nothing was kept"):
        load_dataset("mnist", DataOptions(data_dir=tmp_path / "data", download=True))
    assert not any((tmp_path / "data").rglob("*.gz"))
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources",
                        [(p.name, md5(p)) for p in sorted(server.iterdir())])
    data = load_dataset("mnist", DataOptions(data_dir=tmp_path / "data", download=True))
    assert len(data.train_images) == 12
    labels = gzip.decompress((tmp_path / "data/MNIST/raw/train-labels-idx1-ubyte.gz").read_bytes())[8:]
    assert list(labels) == [i % 10 for i in range(12)]


# --- SVHN -------------------------------------------------------------------------------------


def test_svhn_round_trip_maps_label_10_to_digit_0(tmp_path):
    from localitylab.data.svhn import load_svhn_files

    written = write_svhn(tmp_path)
    data = load_svhn_files(DataOptions(data_dir=tmp_path), md5s={p.name: md5(p) for p in tmp_path.iterdir()})
    images, digits = written["train_32x32.mat"]
    assert torch.equal(data.train_images, torch.from_numpy(images))
    assert data.train_labels.tolist() == digits.tolist() and 0 in data.train_labels.tolist()
    assert torch.equal(data.test_images, torch.from_numpy(written["test_32x32.mat"][0]))
    assert data.info.num_classes == 10 and not data.info.hflip and data.info.crop_padding == 4


def test_svhn_checks_md5_and_says_what_is_missing(tmp_path):
    write_svhn(tmp_path)
    with pytest.raises(UserError, match="train_32x32.mat has MD5"):
        load_dataset("svhn", DataOptions(data_dir=tmp_path))
    (tmp_path / "test_32x32.mat").unlink()
    with pytest.raises(UserError, match=r"put test_32x32.mat in .*, or pass download to fetch it from http"):
        load_dataset("svhn", DataOptions(data_dir=tmp_path))


def test_svhn_not_a_mat_file_is_one_line(tmp_path):
    from localitylab.data.svhn import load_svhn_files

    write_svhn(tmp_path)
    (tmp_path / "test_32x32.mat").write_bytes(b"MATLAB? no")
    with pytest.raises(UserError, match="test_32x32.mat is not a readable MATLAB file"):
        load_svhn_files(DataOptions(data_dir=tmp_path), md5s=None)


# --- STL-10 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("as_archive", [False, True])
def test_stl10_round_trip_column_major_images(tmp_path, as_archive):
    from localitylab.data.stl10 import load_stl10_files

    written = write_stl10(tmp_path, as_archive=as_archive)
    data = load_stl10_files(DataOptions(data_dir=tmp_path), md5s=None)
    assert torch.equal(data.train_images, torch.from_numpy(written["images"]["train"]))
    assert torch.equal(data.test_images, torch.from_numpy(written["images"]["test"]))
    assert data.train_labels.tolist() == written["labels"]["train"].tolist()
    assert data.test_labels.tolist() == written["labels"]["test"].tolist()
    assert data.info.class_names == STL10_CLASSES and data.info.img_size == 96
    assert data.info.hflip and data.info.crop_padding == 12
    if as_archive:  # the five members were copied out, the unlabelled images were not
        assert sorted(p.name for p in (tmp_path / "stl10_binary").iterdir()) == sorted(
            ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "class_names.txt"])


def test_stl10_archive_checked_against_its_md5(tmp_path):
    from localitylab.data.stl10 import load_stl10_files

    write_stl10(tmp_path, as_archive=True)
    with pytest.raises(UserError, match="stl10_binary.tar.gz has MD5 .* expected 0000"):
        load_stl10_files(DataOptions(data_dir=tmp_path), md5s={"stl10_binary.tar.gz": "0" * 32})
    assert not (tmp_path / "stl10_binary").exists()


# --- Tiny-ImageNet ----------------------------------------------------------------------------


def _assert_colours_match_labels(images: torch.Tensor, labels: torch.Tensor, tolerance: int = 6):
    for image, label in zip(images, labels):
        centre = image[:, image.shape[1] // 2, image.shape[2] // 2].int()
        if image.shape[0] == 3 and bool((image[0] == image[1]).all() and (image[1] == image[2]).all()):
            continue  # a greyscale JPEG in a colour set, replicated into three channels
        expected = torch.tensor(colour_of(int(label)))
        assert (centre - expected).abs().max() <= tolerance, (centre, expected, int(label))


@pytest.mark.parametrize("as_zip", [False, True])
def test_tiny_imagenet_round_trip(tmp_path, as_zip):
    written = write_tiny_imagenet(tmp_path, as_zip=as_zip)
    data = load_dataset("tiny-imagenet", DataOptions(data_dir=tmp_path))
    assert data.train_images.shape == (6, 3, 64, 64) and data.test_images.shape == (6, 3, 64, 64)
    assert data.train_labels.tolist() == sorted(written["train_labels"])  # sorted wnids, then files
    assert data.test_labels.tolist() == written["val_labels"]
    assert data.info.class_names == ["goldfish", "European fire salamander", "Chihuahua"]
    assert data.info.hflip and data.info.crop_padding == 8
    _assert_colours_match_labels(data.train_images, data.train_labels)
    _assert_colours_match_labels(data.test_images, data.test_labels)
    # --img-size resizes.
    small = load_dataset("tiny-imagenet", DataOptions(data_dir=tmp_path, img_size=16))
    assert small.train_images.shape == (6, 3, 16, 16) and small.info.crop_padding == 2


def test_tiny_imagenet_missing_says_where_to_fetch_and_download_does_not_guess(tmp_path):
    with pytest.raises(UserError, match=r"put tiny-imagenet-200.zip .* in .*; it is at http://cs231n"):
        load_dataset("tiny-imagenet", DataOptions(data_dir=tmp_path))
    with pytest.raises(UserError, match="publishes no checksum, so localitylab does not download it; fetch http"):
        load_dataset("tiny-imagenet", DataOptions(data_dir=tmp_path, download=True))


def test_tiny_imagenet_bad_annotation_names_the_line(tmp_path):
    write_tiny_imagenet(tmp_path)
    annotations = tmp_path / "tiny-imagenet-200/val/val_annotations.txt"
    annotations.write_text(annotations.read_text() + "val_99.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(UserError, match="val_annotations.txt line 7"):
        load_dataset("tiny-imagenet", DataOptions(data_dir=tmp_path))


# --- ImageNet ---------------------------------------------------------------------------------


def test_imagenet_archives_round_trip_in_one_streaming_pass(tmp_path):
    from localitylab.data.imagenet import load_imagenet_files

    written = write_imagenet(tmp_path / "imagenet")
    digests = {p.name: md5(p) for p in (tmp_path / "imagenet").iterdir()}
    data = load_imagenet_files(DataOptions(data_dir=tmp_path, img_size=16), md5s=digests)
    assert data.train_images.shape == (6, 3, 16, 16) and data.test_images.shape == (6, 3, 16, 16)
    assert data.train_labels.tolist() == written["train_labels"]
    # Validation labels come from the devkit's ILSVRC2012_IDs, mapped to the sorted wnids.
    assert data.test_labels.tolist() == written["val_labels"]
    assert data.info.class_names == ["goldfish", "European fire salamander", "Chihuahua"]
    _assert_colours_match_labels(data.train_images, data.train_labels)
    _assert_colours_match_labels(data.test_images, data.test_labels)
    assert not (tmp_path / "imagenet" / "train").exists()  # nothing was extracted


def test_imagenet_archive_md5_is_checked_while_reading(tmp_path):
    from localitylab.data.imagenet import load_imagenet_files

    write_imagenet(tmp_path)  # the data folder itself holds the archives, as torchvision's root
    with pytest.raises(UserError, match="ILSVRC2012_img_train.tar has MD5 .* expected 1111"):
        load_imagenet_files(DataOptions(data_dir=tmp_path, img_size=8), md5s={"ILSVRC2012_img_train.tar": "1" * 32})
    # The official digests are torchvision's.
    with pytest.raises(UserError, match="expected 1d675b47d978889d74fa0da5fadfb00e"):
        load_dataset("imagenet", DataOptions(data_dir=tmp_path, img_size=8, cache=False))


def test_imagenet_extracted_layout_with_devkit_names(tmp_path):
    written = write_imagenet(tmp_path / "imagenet", extracted=True)
    data = load_dataset("imagenet", DataOptions(data_dir=tmp_path, img_size=8))
    assert data.train_labels.tolist() == written["train_labels"]
    assert data.test_labels.tolist() == written["val_labels"]
    assert data.info.class_names[2] == "Chihuahua" and data.info.hflip


def test_imagenet_needs_img_size_and_is_never_downloaded(tmp_path):
    with pytest.raises(UserError, match="imagenet needs img_size"):
        load_dataset("imagenet", DataOptions(data_dir=tmp_path))
    with pytest.raises(UserError, match="cannot be downloaded for you: fetch ILSVRC2012_img_train.tar"):
        load_dataset("imagenet", DataOptions(data_dir=tmp_path, img_size=32, download=True))


def test_a_set_too_large_for_memory_is_refused_before_decoding(monkeypatch):
    from localitylab.data import images

    monkeypatch.setattr(images, "physical_memory", lambda: 2**30)
    with pytest.raises(UserError, match="1,281,167 images at 64x64 are 14.7 GiB .* smaller img_size"):
        images.check_fits("imagenet", 1_281_167, 64)


# --- the registry: defaults and listing ----------------------------------------------------------


def test_every_data_set_has_defaults_its_loader_applies(tmp_path):
    write_idx_dataset(tmp_path / "FashionMNIST/raw", gz=False)
    for name in ("digits", "shapes-8", "nonlocal-8", "fashion-mnist"):
        defaults = dataset_defaults(name)
        info = load_dataset(name, DataOptions(data_dir=tmp_path)).info
        assert (info.hflip, info.crop_padding) == (defaults.hflip, defaults.crop_for(info.img_size)), name
    digits = dataset_defaults("digits")
    assert (digits.batch_size, digits.warmup_epochs) == (32, 1)
    assert dataset_defaults("folder:/x").hflip is False and dataset_defaults("hf:a/b").hflip is False
    assert known_shape("svhn").train_images == 73257 and known_shape("digits") is None
    # What a probe of a checkpoint must resize as in training (--img-size of the run).
    assert [takes_img_size(n) for n in ("folder:x", "hf:a/b", "imagenet", "tiny-imagenet", "digits", "shapes-8",
                                        "mnist")] == [True] * 4 + [False] * 3
    with pytest.raises(UserError, match="unknown data set"):
        dataset_defaults("places365")


def test_the_user_choice_of_flip_and_crop_wins(tmp_path):
    data = load_dataset("digits", DataOptions(hflip=True, crop_padding=1))
    assert data.info.hflip and data.info.crop_padding == 1
    cifar_like = load_dataset("shapes-8", DataOptions(hflip=False))
    assert not cifar_like.info.hflip and cifar_like.info.crop_padding == 1
    with pytest.raises(UserError, match="crop_padding must be >= 0"):
        load_dataset("digits", DataOptions(crop_padding=-1))


def test_every_entry_says_whether_it_is_here(tmp_path):
    names = {entry.pattern for entry in dataset_entries()}
    assert {"mnist", "fashion-mnist", "svhn", "stl10", "tiny-imagenet", "imagenet", "hf:NAME[:CONFIG]",
            "folder:PATH", "cifar10", "digits"} <= names
    for entry in dataset_entries():
        assert entry.availability(DataOptions(data_dir=tmp_path))


# --- agreement with torchvision's own readers on the same files ------------------------------------


def test_the_loaders_agree_with_torchvision_on_the_same_files(tmp_path, monkeypatch):
    # torchvision's MNIST, SVHN and STL10 classes read these formats too (with their own
    # checksums switched off for the miniatures): every image and label must agree.
    import torchvision.datasets as tvd

    from localitylab.data.mnist import load_idx_variant
    from localitylab.data.stl10 import load_stl10_files
    from localitylab.data.svhn import load_svhn_files

    write_idx_dataset(tmp_path / "MNIST/raw", gz=False)
    write_svhn(tmp_path)
    write_stl10(tmp_path)
    monkeypatch.setattr(tvd.SVHN, "split_list", {k: [url, name, None] for k, (url, name, _) in tvd.SVHN.split_list.items()})
    monkeypatch.setattr(tvd.STL10, "train_list", [[name, None] for name, _ in tvd.STL10.train_list])
    monkeypatch.setattr(tvd.STL10, "test_list", [[name, None] for name, _ in tvd.STL10.test_list])
    ours = {"mnist": load_idx_variant("mnist", DataOptions(data_dir=tmp_path), md5s=None),
            "svhn": load_svhn_files(DataOptions(data_dir=tmp_path), md5s=None),
            "stl10": load_stl10_files(DataOptions(data_dir=tmp_path), md5s=None)}
    theirs = {"mnist": [tvd.MNIST(tmp_path, train=split == "train") for split in ("train", "test")],
              "svhn": [tvd.SVHN(tmp_path, split=split) for split in ("train", "test")],
              "stl10": [tvd.STL10(tmp_path, split=split) for split in ("train", "test")]}
    for name, data in ours.items():
        for (images, labels), reference in zip((data.split("train"), data.split("test")), theirs[name]):
            expected = torch.as_tensor(np.asarray(reference.data))
            expected = expected.unsqueeze(1) if expected.ndim == 3 else expected
            assert torch.equal(images, expected), name
            assert labels.tolist() == [int(t) for t in (reference.targets if name == "mnist" else reference.labels)], name

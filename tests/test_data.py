"""Data sets: digits, CIFAR in the official format, image folders, permutations, batching."""

from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from localitylab.data import DataOptions, load_dataset
from localitylab.data.batching import random_crop, random_hflip, train_batches
from localitylab.data.cifar import load_cifar
from localitylab.data.permutation import invert_permutation, permute_pixels, random_permutation
from localitylab.errors import UserError
from tests.cifar_fixtures import md5, write_cifar_archive


def test_digits_is_a_fixed_stratified_split():
    first, second = load_dataset("digits"), load_dataset("digits")
    assert torch.equal(first.test_images, second.test_images)
    assert first.train_images.shape[1:] == (1, 8, 8) and first.train_images.dtype == torch.uint8
    assert len(first.train_labels) + len(first.test_labels) == 1797
    # Stratified: every class holds the same share of the test set, to within one image.
    counts = torch.bincount(first.test_labels, minlength=10).float()
    assert counts.max() - counts.min() <= 2
    assert first.info.num_classes == 10 and not first.info.hflip
    assert int(first.train_images.max()) == 255


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_cifar_reads_miniature_official_archives(tmp_path, variant):
    archive, members = write_cifar_archive(tmp_path, variant)
    data = load_cifar(variant, DataOptions(data_dir=tmp_path), md5=md5(archive))
    label_key = b"labels" if variant == "cifar10" else b"fine_labels"
    test = members["test_batch" if variant == "cifar10" else "test"]
    # Row layout: 1024 red, then 1024 green, then 1024 blue values, row-major.
    expected = torch.from_numpy(test[b"data"].reshape(-1, 3, 32, 32))
    assert torch.equal(data.test_images, expected)
    assert data.test_labels.tolist() == test[label_key]
    assert data.info.in_chans == 3 and data.info.img_size == 32 and data.info.hflip
    assert data.info.num_classes == (10 if variant == "cifar10" else 100)
    assert data.info.class_names[3] == ("class3" if variant == "cifar10" else "fine3")


def test_cifar_reads_the_extracted_folder_too(tmp_path):
    write_cifar_archive(tmp_path, "cifar10", as_folder=True)
    data = load_cifar("cifar10", DataOptions(data_dir=tmp_path))
    assert len(data.train_images) == 5 * 6


def test_cifar_refuses_a_wrong_checksum(tmp_path):
    write_cifar_archive(tmp_path, "cifar10")
    with pytest.raises(UserError, match="MD5"):
        load_cifar("cifar10", DataOptions(data_dir=tmp_path))  # official checksum


def test_cifar_download_refuses_a_wrong_checksum_and_keeps_nothing(tmp_path):
    source = tmp_path / "server"
    archive, _ = write_cifar_archive(source, "cifar10")
    from localitylab.data.cifar import download

    dest = tmp_path / "data" / archive.name
    with pytest.raises(UserError, match="MD5"):
        download(archive.as_uri(), dest, "0" * 32)
    assert not dest.exists() and not any(dest.parent.iterdir())
    download(archive.as_uri(), dest, md5(archive))
    assert md5(dest) == md5(archive)


def test_cifar_missing_says_what_to_put_where(tmp_path):
    with pytest.raises(UserError, match="cifar-100-python.tar.gz"):
        load_dataset("cifar100", DataOptions(data_dir=tmp_path))


def test_cifar_batch_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder, _ = write_cifar_archive(tmp_path, "cifar10", as_folder=True)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(UserError, match="refusing"):
        load_cifar("cifar10", DataOptions(data_dir=tmp_path))
    assert not marker.exists()


def test_cifar_archive_member_paths_are_never_extracted(tmp_path):
    # A member named with '..' is simply not what the loader reads: nothing lands outside.
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../escaped")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(UserError, match="no member"):
        load_cifar("cifar10", DataOptions(data_dir=tmp_path), md5=None)
    assert not (tmp_path.parent / "escaped").exists()


def _write_folder(root, classes=("cat", "dog"), per_class=3, size=(10, 14)):
    for split in ("train", "val"):
        for ci, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(per_class):
                colour = (40 * ci + k, 100, 200)
                Image.new("RGB", size, colour).save(folder / f"{k}.png")


def test_folder_dataset_reads_and_resizes(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")  # skipped by extension
    data = load_dataset(f"folder:{tmp_path}", DataOptions(img_size=8))
    assert data.train_images.shape == (6, 3, 8, 8)
    assert data.info.class_names == ["cat", "dog"]
    assert data.train_labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert int(data.train_images[3, 0, 4, 4]) == 40  # a flat colour survives resizing


def test_folder_dataset_errors(tmp_path):
    with pytest.raises(UserError, match="needs img_size"):
        load_dataset(f"folder:{tmp_path}")
    with pytest.raises(UserError, match="train"):
        load_dataset(f"folder:{tmp_path}", DataOptions(img_size=8))
    _write_folder(tmp_path)
    (tmp_path / "val" / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="broken.png"):
        load_dataset(f"folder:{tmp_path}", DataOptions(img_size=8))


def test_folder_is_not_flipped_unless_asked():
    # A folder's content is unknown (digits, letters, text): no flips by default.
    from localitylab.data.registry import dataset_defaults

    assert dataset_defaults("folder:anything").hflip is False


def test_folder_keeps_grey_images_grey_and_mixed_ones_rgb(tmp_path):
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("L", (6, 6), 50).save(tmp_path / split / name / "0.png")
    assert load_dataset(f"folder:{tmp_path}", DataOptions(img_size=4)).info.in_chans == 1
    Image.new("RGB", (6, 6), (10, 20, 30)).save(tmp_path / "val" / "b" / "1.png")
    data = load_dataset(f"folder:{tmp_path}", DataOptions(img_size=4))
    assert data.info.in_chans == 3 and data.train_images[0, :, 0, 0].tolist() == [50, 50, 50]


# --- the decoded-image cache --------------------------------------------------------------------


def test_folder_cache_is_used_on_the_second_run(tmp_path, monkeypatch):
    from localitylab.data import folder

    _write_folder(tmp_path / "data")
    first = load_dataset(f"folder:{tmp_path / 'data'}", DataOptions(img_size=8))
    assert first.extra["cache"]["hit"] is False

    def no_decoding(*args, **kwargs):
        raise AssertionError("the second run decoded the images again")

    monkeypatch.setattr(folder, "decode_images", no_decoding)
    second = load_dataset(f"folder:{tmp_path / 'data'}", DataOptions(img_size=8))
    assert second.extra["cache"] == {"path": first.extra["cache"]["path"], "hit": True}
    for a, b in ((first.train_images, second.train_images), (first.test_labels, second.test_labels)):
        assert torch.equal(a, b)
    assert second.info.to_dict() == first.info.to_dict()
    # Another image size is another entry.
    monkeypatch.undo()
    other = load_dataset(f"folder:{tmp_path / 'data'}", DataOptions(img_size=4))
    assert other.extra["cache"]["hit"] is False and other.extra["cache"]["path"] != first.extra["cache"]["path"]


def test_folder_cache_is_invalidated_when_a_file_changes(tmp_path):
    _write_folder(tmp_path / "data")
    name = f"folder:{tmp_path / 'data'}"
    before = load_dataset(name, DataOptions(img_size=8))
    changed = tmp_path / "data" / "train" / "dog" / "0.png"
    Image.new("RGB", (10, 14), (250, 0, 0)).save(changed)  # same size on disk or not, a new mtime
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    after = load_dataset(name, DataOptions(img_size=8))
    assert after.extra["cache"]["hit"] is False
    assert after.train_images[3, :, 4, 4].tolist() == [250, 0, 0] != before.train_images[3, :, 4, 4].tolist()
    # An added file changes the key too.
    Image.new("RGB", (10, 14), (0, 0, 250)).save(tmp_path / "data" / "val" / "cat" / "9.png")
    assert len(load_dataset(name, DataOptions(img_size=8)).test_images) == 7


def test_no_cache_neither_reads_nor_writes(tmp_path, monkeypatch):
    from localitylab.data import cache, folder

    monkeypatch.setenv("LOCALITYLAB_CACHE_DIR", str(tmp_path / "cache"))
    _write_folder(tmp_path / "data")
    name = f"folder:{tmp_path / 'data'}"
    uncached = load_dataset(name, DataOptions(img_size=8, cache=False))
    assert uncached.extra["cache"]["hit"] is False and not (tmp_path / "cache").exists()
    load_dataset(name, DataOptions(img_size=8))
    (entry,) = (tmp_path / "cache").iterdir()
    assert entry.suffix == ".safetensors" and entry.name.startswith("folder-data-")
    decoded = []
    monkeypatch.setattr(folder, "decode_images", lambda *a, **k: decoded.append(1) or cache.torch.zeros(6, 3, 8, 8,
                                                                                                          dtype=cache.torch.uint8))
    load_dataset(name, DataOptions(img_size=8, cache=False))
    assert decoded, "--no-cache read the cache"


def test_a_damaged_cache_entry_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALITYLAB_CACHE_DIR", str(tmp_path / "cache"))
    _write_folder(tmp_path / "data")
    name = f"folder:{tmp_path / 'data'}"
    first = load_dataset(name, DataOptions(img_size=8))
    entry = tmp_path / "cache" / os.path.basename(first.extra["cache"]["path"])
    entry.write_bytes(entry.read_bytes()[:100])
    again = load_dataset(name, DataOptions(img_size=8))
    assert again.extra["cache"]["hit"] is False and torch.equal(again.train_images, first.train_images)
    assert load_dataset(name, DataOptions(img_size=8)).extra["cache"]["hit"] is True


def test_the_cache_entry_holds_only_tensors_and_json(tmp_path, monkeypatch):
    from safetensors import safe_open

    monkeypatch.setenv("LOCALITYLAB_CACHE_DIR", str(tmp_path / "cache"))
    _write_folder(tmp_path / "data")
    data = load_dataset(f"folder:{tmp_path / 'data'}", DataOptions(img_size=8))
    with safe_open(data.extra["cache"]["path"], framework="pt") as handle:
        assert sorted(handle.keys()) == ["test_images", "test_labels", "train_images", "train_labels"]
        assert handle.metadata()["class_names"] == '["cat", "dog"]'


# --- bad image files ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["bomb", "truncated"])
def test_a_bomb_or_a_truncated_image_is_one_user_error_naming_the_file(tmp_path, monkeypatch, bad):
    from tests.dataset_fixtures import bomb_png, truncated_jpeg

    monkeypatch.setenv("LOCALITYLAB_CACHE_DIR", str(tmp_path / "cache"))
    _write_folder(tmp_path / "data")
    path = tmp_path / "data" / "val" / "dog" / ("huge.png" if bad == "bomb" else "cut.jpg")
    path.write_bytes(bomb_png() if bad == "bomb" else truncated_jpeg())
    message = "decompression bomb" if bad == "bomb" else "is not a readable image: image file is truncated"
    with pytest.raises(UserError, match=message) as caught:
        load_dataset(f"folder:{tmp_path / 'data'}", DataOptions(img_size=8))
    assert str(path) in str(caught.value)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing cached


def test_decoding_in_threads_keeps_the_order_and_reports_the_first_bad_file(tmp_path):
    from localitylab.data.images import decode_images

    paths = []
    for k in range(40):
        paths.append(tmp_path / f"{k}.png")
        Image.new("L", (3, 3), k).save(paths[-1])
    images = decode_images(((str(p), str(p)) for p in paths), 40, None, "test", workers=4)
    assert images.shape == (40, 1, 3, 3) and images[:, 0, 1, 1].tolist() == list(range(40))
    paths[7].write_bytes(b"junk")
    paths[30].write_bytes(b"junk")
    with pytest.raises(UserError, match="7.png is not a readable image"):
        decode_images(((str(p), str(p)) for p in paths), 40, None, "test", workers=4)
    Image.new("L", (4, 3), 0).save(paths[7])
    with pytest.raises(UserError, match="7.png is 4x3, not square|7.png is 4x3, but"):
        decode_images(((str(p), str(p)) for p in paths[:8]), 8, None, "test", workers=4)


def test_unknown_dataset_names_the_valid_ones():
    with pytest.raises(UserError, match="digits"):
        load_dataset("places365")


def test_permutation_round_trip_and_seeding():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).reshape(2, 3, 4, 4)
    perm = random_permutation(16, seed=7)
    assert torch.equal(perm, random_permutation(16, seed=7))
    assert not torch.equal(perm, random_permutation(16, seed=8))
    shuffled = permute_pixels(images, perm)
    assert not torch.equal(shuffled, images)
    assert torch.equal(permute_pixels(shuffled, invert_permutation(perm)), images)
    # Channels move together: the same position permutation on every channel.
    assert torch.equal(shuffled[:, 1] - shuffled[:, 0], torch.full((2, 4, 4), 16, dtype=torch.uint8))
    assert torch.equal(permute_pixels(images, torch.arange(16)), images)


def test_random_crop_equals_torchvision_crop_at_the_same_offsets():
    from torchvision.transforms import functional as TF

    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    cropped = random_crop(images, 2, gen)
    offsets = torch.randint(0, 5, (2, 16), generator=torch.Generator().manual_seed(0))
    for b in range(16):
        padded = TF.pad(images[b], [2, 2, 2, 2], fill=0)
        expected = TF.crop(padded, int(offsets[0, b]), int(offsets[1, b]), 8, 8)
        assert torch.equal(cropped[b], expected)


def test_crop_offsets_and_flips_are_uniform():
    # Same distribution as RandomCrop(padding=p) + RandomHorizontalFlip: offsets uniform on
    # 0..2p, flips with probability 1/2 (chi-square-free check: every cell near n / cells).
    images = torch.zeros(20000, 1, 4, 4, dtype=torch.uint8)
    images[:, :, 0, 0] = 255  # a marker pixel reveals the offset
    gen = torch.Generator().manual_seed(1)
    out = random_crop(images, 1, gen)
    hits = out[:, 0].nonzero()  # (image, row, col) where the marker landed
    cells = torch.bincount(hits[:, 1] * 4 + hits[:, 2], minlength=16).float()
    # Marker at (0,0) lands at (1-dy, 1-dx) for dy, dx in {0, 1, 2}: 4 visible cells.
    visible = cells[[0, 1, 4, 5]]
    assert visible.sum() == pytest.approx(20000 * 4 / 9, rel=0.03)
    assert (visible / visible.mean() - 1).abs().max() < 0.06
    flipped = random_hflip(images, torch.Generator().manual_seed(2))
    assert (flipped[:, 0, 0, 3] == 255).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_train_batches_cover_each_image_at_most_once_per_epoch():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    labels = torch.arange(10)
    seen = [lab for _, lab in train_batches(images, labels, 3, seed=0)]
    flat = torch.cat(seen)
    assert len(flat) == 9 and len(set(flat.tolist())) == 9  # last partial batch dropped


def test_digits_read_from_the_cache_equal_the_split_scikit_learn_makes(tmp_path, monkeypatch):
    """digits keeps its split in the image cache; read back (with scikit-learn unimportable),
    it is the split scikit-learn makes, tensor for tensor."""
    import sys

    monkeypatch.setenv("LOCALITYLAB_CACHE_DIR", str(tmp_path / "cache"))
    split = load_dataset("digits", DataOptions(cache=False))
    assert not (tmp_path / "cache").exists()
    load_dataset("digits")
    (entry,) = (tmp_path / "cache").iterdir()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # any import of it now fails
    cached = load_dataset("digits")
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        ours, theirs = getattr(cached, name), getattr(split, name)
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), name
    assert cached.info == split.info and len(cached.test_labels) == 360

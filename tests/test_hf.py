"""`hf:NAME[:CONFIG]` through Hugging Face datasets, offline: data sets the tests write in the
library's own formats (save_to_disk folders, Parquet repositories, and the Arrow cache an
online load leaves), with HF_HUB_OFFLINE on so nothing reaches for the network."""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pytest
import torch

from localitylab.data import DataOptions, load_dataset
from localitylab.errors import UserError

datasets = pytest.importorskip("datasets")


@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
    """Offline mode on, and a private datasets cache; returns that cache's folder."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-datasets-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def png(pixels: np.ndarray) -> dict:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def make_split(n: int, seed: int, size=(8, 8), labels=None, mode="RGB", extra=None):
    """n random images (PNG bytes, lossless) with ClassLabel labels 0..2, in an Image column."""
    rng = np.random.default_rng(seed)
    shape = (*size, 3) if mode == "RGB" else size
    pixels = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]
    features = {"img": datasets.Image(), "label": datasets.ClassLabel(names=["ant", "bee", "cat"])}
    columns = {"img": [png(p) for p in pixels], "label": labels if labels is not None else [i % 3 for i in range(n)]}
    for name, (feature, values) in (extra or {}).items():
        features[name] = feature
        columns[name] = values
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features)), pixels


def as_tensor(pixels: list[np.ndarray]) -> torch.Tensor:
    stacked = np.stack(pixels)
    return torch.from_numpy(stacked.transpose(0, 3, 1, 2) if stacked.ndim == 4 else stacked[:, None])


def test_hf_saved_to_disk_round_trip(tmp_path, hf_offline):
    train, train_pixels = make_split(7, 0)
    test, test_pixels = make_split(4, 1)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(tmp_path / "saved")
    data = load_dataset(f"hf:{tmp_path / 'saved'}")
    assert torch.equal(data.train_images, as_tensor(train_pixels))
    assert torch.equal(data.test_images, as_tensor(test_pixels))
    assert data.train_labels.tolist() == [i % 3 for i in range(7)] and data.test_labels.tolist() == [0, 1, 2, 0]
    assert data.info.class_names == ["ant", "bee", "cat"] and data.info.img_size == 8 and data.info.in_chans == 3
    assert not data.info.hflip and data.extra["hf"] == {"image_column": "img", "label_column": "label",
                                                        "test_split": "test"}


def write_hub_cache(cache, repo_id: str, splits: dict, sha: str = "0123456789abcdef0123456789abcdef01234567"):
    """What `load_dataset(repo_id)` leaves in the datasets cache after an online load of a
    Parquet repository: <cache>/<namespace>___<name>/default/0.0.0/<commit>/ with
    dataset_info.json and one Arrow file per split. Written here by the same Parquet builder
    from local Parquet files, then placed under the repository's name."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    staging = cache.parent / "parquet-repo"
    files = {}
    for name, split in splits.items():
        files[name] = str(staging / "data" / f"{name}-00000-of-00001.parquet")
        os.makedirs(os.path.dirname(files[name]), exist_ok=True)
        split.to_parquet(files[name])
    namespace, name = repo_id.split("/")
    builder = Parquet(cache_dir=str(cache), dataset_name=name, config_name="default", hash=sha, data_files=files)
    builder.download_and_prepare()
    target = cache / f"{namespace}___{name}" / "default" / "0.0.0" / sha
    target.parent.mkdir(parents=True)
    shutil.move(builder.cache_dir, target)
    return staging


def test_hf_hub_data_set_offline_from_the_datasets_cache(hf_offline):
    train, train_pixels = make_split(6, 0)
    validation, validation_pixels = make_split(3, 1)
    unlabelled, _ = make_split(2, 2, labels=[-1, -1])  # like ImageNet's test split on the Hub
    write_hub_cache(hf_offline, "someone/tiny-set", {"train": train, "validation": validation, "test": unlabelled})
    data = load_dataset("hf:someone/tiny-set")
    assert torch.equal(data.train_images, as_tensor(train_pixels))
    # The test split has no labels: the validation split is the test split.
    assert torch.equal(data.test_images, as_tensor(validation_pixels)) and data.extra["hf"]["test_split"] == "validation"
    assert load_dataset("hf:someone/tiny-set:default").train_labels.tolist() == data.train_labels.tolist()
    with pytest.raises(UserError, match="hf:someone/tiny-set:nope: Couldn't find cache for someone/tiny-set for config 'nope'"):
        load_dataset("hf:someone/tiny-set:nope")


def test_hf_not_cached_while_offline_is_one_line(hf_offline):
    with pytest.raises(UserError, match=r"hf:someone/absent is not in the local Hugging Face cache and the hub is "
                                        r"offline \(HF_HUB_OFFLINE\)"):
        load_dataset("hf:someone/absent")


def test_hf_local_parquet_folder(tmp_path, hf_offline):
    train, train_pixels = make_split(5, 3, size=(6, 6), mode="L")
    test, _ = make_split(3, 4, size=(6, 6), mode="L")
    (tmp_path / "repo" / "data").mkdir(parents=True)
    train.to_parquet(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet")
    test.to_parquet(tmp_path / "repo" / "data" / "test-00000-of-00001.parquet")
    data = load_dataset(f"hf:{tmp_path / 'repo'}", DataOptions(img_size=6))
    assert data.info.in_chans == 1 and torch.equal(data.train_images, as_tensor(train_pixels))


def test_hf_refuses_what_is_not_parquet_or_arrow_and_runs_no_script(tmp_path, hf_offline):
    (tmp_path / "as-json").mkdir()
    (tmp_path / "as-json" / "train.jsonl").write_text('{"image": "a.png", "label": 0}\n')
    with pytest.raises(UserError, match="is stored as json files; localitylab reads only Parquet and Arrow"):
        load_dataset(f"hf:{tmp_path / 'as-json'}")
    marker = tmp_path / "script-ran"
    (tmp_path / "scripted").mkdir()
    (tmp_path / "scripted" / "scripted.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(UserError, match="scripts are no longer supported"):
        load_dataset(f"hf:{tmp_path / 'scripted'}")
    assert not marker.exists()


def test_hf_columns_found_or_named(tmp_path, hf_offline):
    coarse = datasets.ClassLabel(names=["small", "large"])
    train, _ = make_split(6, 0, extra={"coarse_label": (coarse, [i % 2 for i in range(6)]),
                                       "caption": (datasets.Value("string"), ["x"] * 6)})
    test, _ = make_split(2, 1, extra={"coarse_label": (coarse, [1, 0]),
                                      "caption": (datasets.Value("string"), ["y"] * 2)})
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(tmp_path / "two-labels")
    name = f"hf:{tmp_path / 'two-labels'}"
    # Two ClassLabel columns; the one called `label` is the label.
    assert load_dataset(name).info.class_names == ["ant", "bee", "cat"]
    coarse_data = load_dataset(name, DataOptions(label_column="coarse_label"))
    assert coarse_data.info.class_names == ["small", "large"] and coarse_data.test_labels.tolist() == [1, 0]
    with pytest.raises(UserError, match="has no column 'nope'; columns: img, label, coarse_label, caption"):
        load_dataset(name, DataOptions(label_column="nope"))
    with pytest.raises(UserError, match="column 'caption' holds Value.*not images"):
        load_dataset(name, DataOptions(image_column="caption"))
    no_label = datasets.DatasetDict({"train": train.remove_columns(["label"]).rename_column("coarse_label", "size"),
                                     "test": test.remove_columns(["label"]).rename_column("coarse_label", "size")})
    no_label = datasets.DatasetDict({k: v.cast_column("size", datasets.Value("int64")) for k, v in no_label.items()})
    no_label.save_to_disk(tmp_path / "no-label")
    with pytest.raises(UserError, match="has no label column .* name one with label_column"):
        load_dataset(f"hf:{tmp_path / 'no-label'}")
    sized = load_dataset(f"hf:{tmp_path / 'no-label'}", DataOptions(label_column="size"))
    assert sized.info.class_names == ["0", "1"]


def test_hf_string_labels_and_mixed_sizes(tmp_path, hf_offline):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    rng = np.random.default_rng(0)

    def split(sizes, labels):
        return datasets.Dataset.from_dict(
            {"image": [png(rng.integers(0, 256, (*s, 3), dtype=np.uint8)) for s in sizes], "label": labels},
            features=features)

    datasets.DatasetDict({"train": split([(8, 8), (12, 10), (8, 8)], ["zebra", "ant", "zebra"]),
                          "test": split([(9, 9)], ["ant"])}).save_to_disk(tmp_path / "mixed")
    name = f"hf:{tmp_path / 'mixed'}"
    with pytest.raises(UserError, match=r"train row 1 is 10x12, but hf:.* train row 0 is 8x8: give img_size"):
        load_dataset(name)
    data = load_dataset(name, DataOptions(img_size=4))
    assert data.info.class_names == ["ant", "zebra"] and data.train_labels.tolist() == [1, 0, 1]
    assert data.train_images.shape == (3, 3, 4, 4)


def test_hf_decoded_images_are_cached_by_their_arrow_files(tmp_path, hf_offline, monkeypatch):
    from localitylab.data import huggingface

    train, _ = make_split(5, 0)
    test, _ = make_split(2, 1)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(tmp_path / "saved")
    first = load_dataset(f"hf:{tmp_path / 'saved'}")
    assert first.extra["cache"]["hit"] is False
    real = huggingface.decode_images
    monkeypatch.setattr(huggingface, "decode_images", lambda *a, **k: pytest.fail("decoded again"))
    second = load_dataset(f"hf:{tmp_path / 'saved'}")
    assert second.extra["cache"]["hit"] is True and torch.equal(second.train_images, first.train_images)
    # Rewritten data: new Arrow files, a new key.
    monkeypatch.setattr(huggingface, "decode_images", real)
    shutil.rmtree(tmp_path / "saved")
    datasets.DatasetDict({"train": make_split(5, 9)[0], "test": test}).save_to_disk(tmp_path / "saved")
    third = load_dataset(f"hf:{tmp_path / 'saved'}")
    assert third.extra["cache"]["hit"] is False and not torch.equal(third.train_images, first.train_images)


def test_hf_needs_train_and_a_labelled_test_split(tmp_path, hf_offline):
    train, _ = make_split(3, 0)
    datasets.DatasetDict({"train": train}).save_to_disk(tmp_path / "only-train")
    with pytest.raises(UserError, match="has no labelled test split"):
        load_dataset(f"hf:{tmp_path / 'only-train'}")
    train.save_to_disk(tmp_path / "one-split")
    with pytest.raises(UserError, match="holds one split"):
        load_dataset(f"hf:{tmp_path / 'one-split'}")
    with pytest.raises(UserError, match="hf: needs a data set"):
        load_dataset("hf:")


def test_an_hf_run_is_probed_and_evaluated_on_the_columns_it_was_trained_with(tmp_path, hf_offline, monkeypatch):
    from localitylab.probes.sources import load_target
    from localitylab.train import TrainConfig, train
    from localitylab.train.evaluation import evaluate_checkpoint

    coarse = datasets.ClassLabel(names=["small", "large"])
    train_split, _ = make_split(12, 0, extra={"coarse_label": (coarse, [i % 2 for i in range(12)])})
    test_split, _ = make_split(4, 1, extra={"coarse_label": (coarse, [1, 1, 0, 1])})
    datasets.DatasetDict({"train": train_split, "test": test_split}).save_to_disk(tmp_path / "two-labels")
    name = f"hf:{tmp_path / 'two-labels'}"
    monkeypatch.setenv("LOCALITYLAB_CACHE_DIR", str(tmp_path / "decoded"))
    run = train(TrainConfig("resnet-n", name, label_column="coarse_label", cache=False, epochs=1, device="cpu",
                            out=tmp_path / "run"))
    assert not (tmp_path / "decoded").exists()  # --no-cache: decoded afresh, nothing kept
    # Left to itself the data set's label is `label` (3 classes); the run named coarse_label (2).
    assert load_dataset(name, DataOptions(cache=False)).info.class_names == ["ant", "bee", "cat"]
    _, probed = load_target(str(run.run_dir), device="cpu")
    assert probed.info.class_names == ["small", "large"] and probed.test_labels.tolist() == [1, 1, 0, 1]
    evaluated = evaluate_checkpoint(run.checkpoint, device="cpu")
    assert evaluated["accuracy"] == pytest.approx(run.final["test_acc"]) and evaluated["n_images"] == 4

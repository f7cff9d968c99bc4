"""`hf:NAME[:CONFIG]`: an image-classification data set through Hugging Face `datasets`.

NAME is a Hub id (`uoft-cs/cifar10`, `ylecun/mnist`), read from the Hub or, offline
(HF_HUB_OFFLINE=1), from the `datasets` cache a previous online load left; or a local folder
of Parquet/Arrow files (a Hub repository downloaded with `hf download`), or a folder written
by `Dataset(Dict).save_to_disk`. CONFIG is the Hub configuration (subset) name.

Only Parquet and Arrow data are read: the builder `datasets` picks must be its Parquet or
Arrow reader (or its reader of its own Arrow cache). Data sets stored as CSV/JSON/pickled
pandas/WebDataset files are refused, and `datasets` itself runs no loading scripts and no
remote code. Images are decoded by localitylab (data/images.py: the same resizing, bad-file
and decompression-bomb handling as `folder:`), and cached (data/cache.py) keyed by the Arrow
files they come from.

Columns: the image column is the one `Image` feature, the label column the one `ClassLabel`
(or a column named `label`); where there are several or none, `image_column` /
`label_column` name them. Splits: `train`, and for testing the first of `test`,
`validation`, `valid`, `val` whose labels are all given (ImageNet's `test` has none).
Images keep their size when they all share one; `img_size` resizes (shorter side, then a
centre crop). No flips by default, as for `folder:`: `hflip` where mirror images keep
their class.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import torch

from localitylab.data.cache import DecodedSplits, cached_decode
from localitylab.data.files import file_stamp
from localitylab.data.images import decode_images
from localitylab.data.registry import DataDefaults, DataOptions, ImageDataset, make_dataset, register_dataset
from localitylab.errors import UserError

# The builders that read Parquet or Arrow, and the one that reads datasets' own Arrow cache.
ALLOWED_BUILDERS = {
    "datasets.packaged_modules.parquet.parquet": "Parquet",
    "datasets.packaged_modules.arrow.arrow": "Arrow",
    "datasets.packaged_modules.cache.cache": "Arrow (the datasets cache)",
}
TEST_SPLITS = ("test", "validation", "valid", "val")
LABEL_NAMES = ("label", "labels")
HF_DEFAULTS = DataDefaults(hflip=False)  # localitylab cannot know whether mirror images keep their class


def _datasets():
    try:
        import datasets
    except ImportError:
        raise UserError("hf: data sets need Hugging Face datasets: pip install 'localitylab[hf]'") from None
    return datasets


@contextlib.contextmanager
def _quiet(datasets):
    """datasets' notes off, and its progress bars too unless a person watches stderr."""
    verbosity = datasets.logging.get_verbosity()
    bars_were_disabled = datasets.are_progress_bars_disabled()
    datasets.logging.set_verbosity_error()
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_were_disabled:
            datasets.enable_progress_bars()


def open_splits(arg: str) -> dict[str, Any]:
    """{split name: datasets.Dataset} of hf:ARG, from Parquet/Arrow only."""
    datasets = _datasets()
    from datasets.load import dataset_module_factory

    name, _, config = arg.partition(":")
    if not name:
        raise UserError("hf: needs a data set: hf:NAME or hf:NAME:CONFIG (a Hub id or a local folder)")
    local = Path(name).expanduser()
    with _quiet(datasets):
        if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
            if config:
                raise UserError(f"hf:{arg}: {local} was written by save_to_disk and has no configuration {config!r}")
            try:
                loaded = datasets.load_from_disk(str(local))
            except Exception as err:  # noqa: BLE001 - whatever datasets raises for a damaged folder
                raise UserError(f"hf:{arg}: {local} is not a readable saved data set: {err}") from None
            if not isinstance(loaded, datasets.DatasetDict):
                raise UserError(f"hf:{arg}: {local} holds one split; localitylab needs a DatasetDict with "
                                f"'train' and 'test' (or 'validation')")
            return dict(loaded)
        source = str(local) if local.is_dir() else name
        if not local.is_dir():
            from localitylab.network import hub_offline

            hub_offline()  # one connection attempt: unreachable, the datasets cache only (no retries)
        try:
            # Which reader the data needs, decided from its files before any builder exists
            # (a builder creates its cache folder): anything but Parquet/Arrow stops here.
            module = dataset_module_factory(source).module_path
            if module not in ALLOWED_BUILDERS:
                raise UserError(f"hf:{arg} is stored as {module.rsplit('.', 1)[-1]} files; localitylab reads only "
                                f"Parquet and Arrow data sets (for an image folder, use folder:PATH)")
            builder = datasets.load_dataset_builder(source, config or None)
        except UserError:
            raise
        except ConnectionError:
            from localitylab.network import why_offline

            raise UserError(f"hf:{arg} is not in the local Hugging Face cache and {why_offline()}; load it once "
                            f"online, or name a local folder") from None
        except Exception as err:  # noqa: BLE001 - unknown names, configs and files: datasets' own words
            raise UserError(f"hf:{arg}: {err}") from None
        if type(builder).__module__ not in ALLOWED_BUILDERS:
            raise UserError(f"hf:{arg} is stored as {builder.name} files; localitylab reads only Parquet and Arrow "
                            f"data sets")
        try:
            builder.download_and_prepare()
            return {split: builder.as_dataset(split=split) for split in builder.info.splits}
        except Exception as err:  # noqa: BLE001 - a failed download or a damaged file, in datasets' words
            raise UserError(f"hf:{arg}: could not read it: {err}") from None


def _pick(kind: str, setting: str, named: str | None, candidates: list[str], columns: dict, arg: str,
          preferred: tuple[str, ...] = ()) -> str:
    if named is not None:
        if named not in columns:
            raise UserError(f"hf:{arg} has no column {named!r}; columns: {', '.join(columns)}")
        return named
    if len(candidates) == 1:
        return candidates[0]
    chosen = [c for c in candidates if c in preferred]
    if len(chosen) == 1:
        return chosen[0]
    if not candidates:
        raise UserError(f"hf:{arg} has no {kind} column ({', '.join(f'{c}: {type(f).__name__}' for c, f in columns.items())}); "
                        f"name one with {setting}", setting=setting)
    raise UserError(f"hf:{arg} has several {kind} columns ({', '.join(candidates)}): name one with {setting}",
                    setting=setting)


def choose_columns(features: dict, options: DataOptions, arg: str) -> tuple[str, str]:
    datasets = _datasets()
    images = [c for c, f in features.items() if isinstance(f, datasets.Image)]
    image = _pick("image", "image_column", options.image_column, images, features, arg, ("image", "img"))
    if not isinstance(features[image], datasets.Image):
        raise UserError(f"hf:{arg}: column {image!r} holds {features[image]}, not images")
    labels = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
    if not labels:
        labels = [c for c in LABEL_NAMES if c in features]
    label = _pick("label", "label_column", options.label_column, labels, features, arg, LABEL_NAMES)
    feature = features[label]
    if not isinstance(feature, datasets.ClassLabel) and not (
            isinstance(feature, datasets.Value) and (feature.dtype.startswith(("int", "uint")) or feature.dtype in
                                                     ("string", "large_string"))):
        raise UserError(f"hf:{arg}: column {label!r} holds {feature}; a label column holds class labels, "
                        f"whole numbers or strings")
    return image, label


def _label_values(split, column: str) -> list:
    return split.select_columns([column]).with_format(None)[column]


def _class_names(feature, values: list[list], arg: str) -> tuple[list[str], dict | None]:
    """Class names, and for string labels the map from value to class index."""
    datasets = _datasets()
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names), None
    present = [v for split in values for v in split if v is not None]
    if feature.dtype in ("string", "large_string"):
        names = sorted(set(present))
        return names, {name: i for i, name in enumerate(names)}
    top = max((v for v in present if v >= 0), default=-1)
    return [str(i) for i in range(top + 1)], None


def _labels(values: list, mapping: dict | None, num_classes: int, arg: str, split: str) -> torch.Tensor:
    labels = [mapping[v] if mapping is not None else v for v in values]
    bad = next((i for i, v in enumerate(labels) if v is None or not 0 <= v < num_classes), None)
    if bad is not None:
        raise UserError(f"hf:{arg} {split} row {bad}: label {values[bad]!r} is not one of the {num_classes} classes")
    return torch.tensor(labels, dtype=torch.long)


def _unlabelled(values: list) -> bool:
    return any(v is None or (isinstance(v, int) and v < 0) for v in values)


def _sources(split, column: str, arg: str, name: str):
    datasets = _datasets()
    raw = split.select_columns([column]).cast_column(column, datasets.Image(decode=False))
    row = 0
    for batch in raw.iter(batch_size=256):
        for cell in batch[column]:
            where = f"hf:{arg} {name} row {row}" + (f" ({cell['path']})" if cell and cell.get("path") else "")
            if not cell or (cell.get("bytes") is None and not cell.get("path")):
                raise UserError(f"{where} has no image")
            yield where, cell["bytes"] if cell.get("bytes") is not None else cell["path"]
            row += 1


@register_dataset("hf", "a Hugging Face data set (Hub id or local folder), Parquet/Arrow only; images found or named "
                  "(`image_column`, `label_column`), `img_size` resizes", prefix=True,
                  availability=lambda opts: "any Hub id or local folder (offline: from the HF cache)",
                  defaults=HF_DEFAULTS)
def load_hf(arg: str, options: DataOptions) -> ImageDataset:
    splits = open_splits(arg)
    if "train" not in splits:
        raise UserError(f"hf:{arg} has no 'train' split (splits: {', '.join(splits)})")
    train = splits["train"]
    image_column, label_column = choose_columns(train.features, options, arg)
    train_values = _label_values(train, label_column)
    test_name = None
    for candidate in TEST_SPLITS:
        if candidate in splits and label_column in splits[candidate].features:
            test_values = _label_values(splits[candidate], label_column)
            if test_values and not _unlabelled(test_values):
                test_name = candidate
                break
    if test_name is None:
        raise UserError(f"hf:{arg} has no labelled test split: localitylab tests on the first of "
                        f"{', '.join(TEST_SPLITS)} with every label given (splits: {', '.join(splits)})")
    test = splits[test_name]
    feature = train.features[label_column]
    names, mapping = _class_names(feature, [train_values, test_values], arg)
    size = options.img_size

    def build() -> DecodedSplits:
        train_x = decode_images(_sources(train, image_column, arg, "train"), len(train), size, f"hf:{arg} train")
        test_x = decode_images(_sources(test, image_column, arg, test_name), len(test), size, f"hf:{arg} {test_name}")
        return DecodedSplits(train_x, _labels(train_values, mapping, len(names), arg, "train"),
                             test_x, _labels(test_values, mapping, len(names), arg, test_name), names)

    files = [f["filename"] for split in (train, test) for f in split.cache_files]
    key = {"arg": arg, "splits": ["train", test_name], "columns": [image_column, label_column], "size": size,
           "files": [file_stamp(Path(f)) for f in files]}
    cache: dict = {}
    # A data set held only in memory has no files to key an entry by: it is decoded each time.
    data = cached_decode(f"hf-{arg}", key, build, enabled=options.cache and bool(files), info=cache)
    dataset = make_dataset(f"hf:{arg}", data.train_images, data.train_labels, data.test_images, data.test_labels,
                           data.class_names, **HF_DEFAULTS.augmentation())
    dataset.extra["cache"] = cache
    dataset.extra["hf"] = {"image_column": image_column, "label_column": label_column, "test_split": test_name}
    return dataset

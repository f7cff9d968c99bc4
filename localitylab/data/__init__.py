"""Data: one registry of data sets, each held whole as uint8 tensors.

Built in: `digits` (bundled), `mnist`, `fashion-mnist`, `svhn`, `cifar10`, `cifar100`,
`stl10`, `tiny-imagenet`, `imagenet` (official files, safe readers), `hf:NAME[:CONFIG]`
(Hugging Face datasets, Parquet/Arrow only), `folder:PATH`, and the generated `shapes-S`,
`stripes-S`, `nonlocal-S`. Each registers its recipe defaults (`DataDefaults`); image files are decoded
once and cached (`data/cache.py`).
"""

from localitylab.data.registry import (
    DataDefaults,
    DataInfo,
    DataOptions,
    DataShape,
    ImageDataset,
    dataset_defaults,
    dataset_entries,
    known_shape,
    load_dataset,
    make_dataset,
    register_dataset,
    takes_img_size,
)

# The loaders register themselves when imported; every import of localitylab.data.* runs this
# file first, so the registry is full before anything looks a name up.
from localitylab.data import (  # noqa: E402,F401  isort: skip
    cifar, digits, folder, generated, huggingface, imagenet, mnist, stl10, svhn, tiny_imagenet,
)

__all__ = ["DataDefaults", "DataInfo", "DataOptions", "DataShape", "ImageDataset", "dataset_defaults",
           "dataset_entries", "known_shape", "load_dataset", "make_dataset", "register_dataset", "takes_img_size"]

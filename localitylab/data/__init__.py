"""Data: one registry (`digits`, `cifar10`, `cifar100`, `folder:PATH`, generated sets), held as uint8 tensors."""

from localitylab.data.registry import (
    DataInfo,
    DataOptions,
    ImageDataset,
    dataset_entries,
    load_dataset,
    make_dataset,
    register_dataset,
)

__all__ = ["DataInfo", "DataOptions", "ImageDataset", "dataset_entries", "load_dataset", "make_dataset", "register_dataset"]

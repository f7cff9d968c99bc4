"""Data: one registry (`digits`, `cifar10`, `cifar100`, `folder:PATH`, generated sets), held as
uint8 tensors; each data set registers its recipe defaults (`DataDefaults`)."""

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

__all__ = ["DataDefaults", "DataInfo", "DataOptions", "DataShape", "ImageDataset", "dataset_defaults",
           "dataset_entries", "known_shape", "load_dataset", "make_dataset", "register_dataset", "takes_img_size"]

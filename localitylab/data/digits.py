"""scikit-learn's bundled 8x8 handwritten digits: the offline default data set."""

from __future__ import annotations

import numpy as np
import torch

from localitylab.data.registry import DataOptions, ImageDataset, make_dataset, register_dataset

TEST_FRACTION = 0.2
SPLIT_SEED = 0  # fixed, so every run and every probe sees the same test images


@register_dataset("digits", "8x8 grey handwritten digits, 10 classes, 1,797 images (scikit-learn, bundled)")
def load_digits(options: DataOptions) -> ImageDataset:
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    # Pixel values are counts 0..16 (4x4 blocks of a 32x32 bitmap); map them onto 0..255.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels
    )
    images_t, labels_t = torch.from_numpy(images), torch.from_numpy(labels)
    return make_dataset(
        "digits",
        images_t[train_idx],
        labels_t[train_idx],
        images_t[test_idx],
        labels_t[test_idx],
        class_names=[str(d) for d in range(10)],
        hflip=False,  # a mirrored 2 is not a 2
        crop_padding=0,  # at 8x8 a one-pixel shift moves an eighth of the image
    )

"""scikit-learn's bundled 8x8 handwritten digits: the offline default data set."""

from __future__ import annotations

import numpy as np
import torch

from localitylab.data.registry import DataDefaults, DataOptions, ImageDataset, make_dataset, register_dataset

TEST_FRACTION = 0.2
SPLIT_SEED = 0  # fixed, so every run and every probe sees the same test images


# 1,437 training images: batch 32 gives 44 steps an epoch, and one epoch of warm-up is
# enough. With this recipe pit-n, vit-n/2 and resnet-n all pass 90% in 15 epochs (the demo's
# recipe; with batch 128 and 5 warm-up epochs pit-n ends near 84%). No flips: a mirrored 2
# is not a 2; no crop: at 8x8 a one-pixel shift moves an eighth of the image. Learned
# position tables start at std 1.0, not timm's 0.02: on 64 tokens and 660 steps a large
# random table serves as a fixed position code, and from 0.02 pit-n ends at 30% and vit-n/2
# at 87% where from 1.0 they reach 93% and 97% (docs/defaults.md).
DIGITS_DEFAULTS = DataDefaults(batch_size=32, warmup_epochs=1, hflip=False, crop_padding=0, pos_embed_std=1.0)


@register_dataset("digits", "8x8 grey handwritten digits, 10 classes, 1,797 images (scikit-learn, bundled)",
                  defaults=DIGITS_DEFAULTS)
def load_digits(options: DataOptions) -> ImageDataset:
    from importlib.metadata import version

    from localitylab.data.cache import cached_decode

    # The split, once made, is read from the image cache: importing scikit-learn takes longer
    # than a short run's first epoch (1-3.5 s here). Keyed by its version, whose split it is.
    key = {"sklearn": version("scikit-learn"), "test_fraction": TEST_FRACTION, "split_seed": SPLIT_SEED}
    splits = cached_decode("digits", key, _split_digits, options.cache)
    return make_dataset(
        "digits",
        splits.train_images,
        splits.train_labels,
        splits.test_images,
        splits.test_labels,
        class_names=splits.class_names,
        **DIGITS_DEFAULTS.augmentation(),
    )


def _split_digits():
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    from localitylab.data.cache import DecodedSplits

    bunch = sk_load_digits()
    # Pixel values are counts 0..16 (4x4 blocks of a 32x32 bitmap); map them onto 0..255.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels
    )
    images_t, labels_t = torch.from_numpy(images), torch.from_numpy(labels)
    return DecodedSplits(images_t[train_idx], labels_t[train_idx], images_t[test_idx], labels_t[test_idx],
                         [str(d) for d in range(10)])

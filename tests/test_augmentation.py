"""On-device augmentation draws crops and flips from the same distribution as torchvision.

`tests/test_data.py` checks that our crop equals torchvision's at the same offsets and that
our offsets and flips are uniform. Here both samplers run as they do in training (ours:
`train_batches` over a data set; the reference: `v2.RandomCrop(size, padding)` then
`v2.RandomHorizontalFlip()` per image, as a DataLoader worker applies them), many times on
a marker image whose every crop-and-flip is a distinct picture. Each output is identified
exactly among the (2p + 1)^2 x 2 pictures torchvision's own functional ops can make, and
the two samples are compared cell by cell (joint offsets and flip) with a two-sample
chi-square test. Seeds are fixed, so the outcome is fixed: no flaky draws. (With a correct
sampler each p-value is uniform over seeds; these seeds give p = 0.36 to 0.81, far from the
1e-3 threshold, while a flip probability of 0.4 gives p ~ 1e-46.)
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chi2_contingency

from localitylab.data.batching import train_batches

SIZE, PADDING = 32, 4  # CIFAR's crop
DRAWS = 16_200  # 100 per cell on average
SIGNIFICANCE = 1e-3


def marker(size: int = SIZE) -> torch.Tensor:
    """3 x S x S uint8: channel 0 holds row + 1, channel 1 column + 1, channel 2 a constant, so
    zero padding is distinguishable from the image and every shift and mirror is a new picture."""
    rows = torch.arange(1, size + 1, dtype=torch.uint8).view(size, 1).expand(size, size)
    cols = torch.arange(1, size + 1, dtype=torch.uint8).view(1, size).expand(size, size)
    return torch.stack([rows, cols, torch.full((size, size), 200, dtype=torch.uint8)])


def catalogue(image: torch.Tensor, padding: int) -> tuple[dict[bytes, int], list[tuple[int, int, bool]]]:
    """Every picture RandomCrop(padding) + RandomHorizontalFlip can make of `image`, drawn with
    torchvision's functional ops: {picture bytes: cell}, and each cell's (top, left, flipped)."""
    from torchvision.transforms.v2 import functional as TF

    size = image.shape[-1]
    padded = TF.pad(image, [padding] * 4, fill=0)
    pictures, cells = {}, []
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            crop = TF.crop(padded, top, left, size, size)
            for flipped in (False, True):
                picture = TF.horizontal_flip(crop) if flipped else crop
                pictures[picture.contiguous().numpy().tobytes()] = len(cells)
                cells.append((top, left, flipped))
    assert len(pictures) == len(cells), "the marker must make every crop and flip a distinct picture"
    return pictures, cells


def identify(outputs, pictures: dict[bytes, int]) -> list[int]:
    """The cell of each output; an output no reference draw can make fails the test here."""
    found = []
    for output in outputs:
        key = output.contiguous().numpy().tobytes()
        assert key in pictures, "an augmented image torchvision's RandomCrop + RandomHorizontalFlip cannot produce"
        found.append(pictures[key])
    return found


def ours(count: int, seed: int, batch_size: int = 540) -> torch.Tensor:
    images = marker().expand(count, -1, -1, -1).contiguous()
    labels = torch.zeros(count, dtype=torch.long)
    batches = [b for b, _ in train_batches(images, labels, batch_size, seed, crop_padding=PADDING, hflip=True)]
    return torch.cat(batches)


def reference(count: int, seed: int, flip_p: float = 0.5, padding: int = PADDING) -> list[torch.Tensor]:
    from torchvision.transforms import v2

    transform = v2.Compose([v2.RandomCrop(SIZE, padding=padding), v2.RandomHorizontalFlip(p=flip_p)])
    torch.manual_seed(seed)
    image = marker()
    return [transform(image) for _ in range(count)]


def counts(cells: list[int], size: int) -> list[int]:
    return torch.bincount(torch.tensor(cells), minlength=size).tolist()


@pytest.fixture(scope="module")
def samples():
    pictures, cells = catalogue(marker(), PADDING)
    mine = identify(ours(DRAWS, seed=0), pictures)
    theirs = identify(reference(DRAWS, seed=1), pictures)
    return pictures, cells, mine, theirs


def test_every_augmented_image_is_one_torchvision_can_make(samples):
    pictures, cells, mine, theirs = samples
    assert len(mine) == len(theirs) == DRAWS  # `identify` found every one of them in the catalogue
    # Both samplers reach every cell: no offset or flip is missing on either side.
    assert min(counts(mine, len(cells))) > 0 and min(counts(theirs, len(cells))) > 0


def test_joint_distribution_of_offsets_and_flips_matches_torchvision(samples):
    _, cells, mine, theirs = samples
    table = [counts(mine, len(cells)), counts(theirs, len(cells))]
    assert chi2_contingency(table).pvalue > SIGNIFICANCE
    # The marginals too, where a small bias would hide among 162 cells.
    offset_of = torch.tensor([top * (2 * PADDING + 1) + left for top, left, _ in cells])
    flip_of = torch.tensor([int(flipped) for _, _, flipped in cells])
    for marginal, size in ((offset_of, (2 * PADDING + 1) ** 2), (flip_of, 2)):
        table = [torch.bincount(marginal[torch.tensor(s)], minlength=size).tolist() for s in (mine, theirs)]
        assert chi2_contingency(table).pvalue > SIGNIFICANCE
    # Flip and offset independent in ours as in torchvision's (a draw per transform).
    mine_t = torch.tensor(mine)
    joint = torch.bincount(offset_of[mine_t] * 2 + flip_of[mine_t], minlength=2 * (2 * PADDING + 1) ** 2)
    assert chi2_contingency(joint.view(-1, 2).tolist()).pvalue > SIGNIFICANCE


def test_images_of_a_batch_are_augmented_independently(samples):
    # torchvision draws per image; a batched sampler could share one draw per batch. Neighbours
    # in a batch land in the same cell about as often as two independent draws would (1/162).
    _, cells, mine, theirs = samples
    same = sum(a == b for a, b in zip(mine[0::2], mine[1::2])) / (DRAWS // 2)
    expected = 1 / len(cells)
    assert abs(same - expected) < 5 * (expected / (DRAWS // 2)) ** 0.5 + 1e-9


def test_the_comparison_would_catch_a_different_distribution(samples):
    # The same comparison against torchvision with a biased flip, or a smaller padding, fails:
    # the test above has the power to see a wrong sampler.
    pictures, cells, _, theirs = samples
    theirs = counts(theirs, len(cells))
    biased = counts(identify(reference(DRAWS, seed=2, flip_p=0.4), pictures), len(cells))
    assert chi2_contingency([theirs, biased]).pvalue < SIGNIFICANCE
    # A crop of the image padded by p - 1 is the same picture as one of the image padded by p.
    narrower = counts(identify(reference(DRAWS, seed=3, padding=PADDING - 1), pictures), len(cells))
    assert min(narrower) == 0  # offsets 0 and 2p are never drawn: those cells stay empty

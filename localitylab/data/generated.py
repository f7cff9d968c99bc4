"""Generated data sets whose locality is known, at any size S (`shapes-S`, `stripes-S`, `nonlocal-S`).

Both are drawn by a seeded `torch.Generator` on the CPU, so the same seed gives identical
tensors on every machine. The loaders always use GENERATOR_SEED: a data set is part of the
question, not of the run, so it must not change with a run's `seed`. The generator
functions take the seed as an argument (tests and studies can draw other samples).

shapes-S (label = a local structure). Five classes: disc, square, triangle, cross, ring.
Each image: per-pixel, per-channel uniform noise in [0, 128) as background; one shape of
radius r ~ U[0.18 S, 0.3 S] (at least 1.5 px), centre uniform so the shape stays inside
the image, filled with one colour drawn per channel from [128, 256). Shapes (r = radius,
(dy, dx) from the centre): disc |d| <= r; square max(|dy|, |dx|) <= 0.8 r; triangle
(apex up) -r <= dy <= 0.7 r and |dx| <= 0.6 (dy + r); cross: two bars of half-width
max(0.5, 0.3 r) and half-length r; ring 0.55 r <= |d| <= r. Everything that decides the
label lies within a disc of radius r around the shape.

stripes-S (label = a local texture, present in every small window). Four classes: the
orientation of a grating, 0, 45, 90 or 135 degrees (0 = stripes running left to right).
Each image: a sine grating of period U[3, 6) px at a uniform random phase, mixed between two
colours drawn per channel from [0, 256) (at least 96 apart in their mean), plus per-pixel,
per-channel uniform noise in [-32, 32]. Every 3 x 3 window carries the orientation; the
random phase makes each pixel's expected value the same for every class, so no read-out of
single pixels at fixed places (what a model can do without comparing neighbours) carries the
label.

nonlocal-S (label = a relation between two distant regions; no local structure carries it).
Two fixed q x q patches, q = max(1, S // 8), sit in opposite corners (inset S // 16):
top-left A and bottom-right B. Each is filled with a colour from a palette of 6; the label
is `same` when A and B have the same colour and `different` otherwise (balanced). A's colour
and B's colour are each uniform over the palette whatever the label, so no window that
sees only one of them, or anything else, carries information; only the pair does.
Distractors: round(S^2 / 64) further q x q patches of palette colours at random places
clear of A and B, over uniform noise in [0, 64).

Sizes: 3,000 training and 750 test images up to S = 64, then fewer so a set stays under
about 130 MB of uint8 (never fewer than 400 training images).
"""

from __future__ import annotations

import torch

from localitylab.data.registry import DataDefaults, DataOptions, ImageDataset, make_dataset, register_dataset

GENERATOR_SEED = 1406_2024  # fixed: every run, whatever its seed, sees the same images
SHAPE_NAMES = ("disc", "square", "triangle", "cross", "ring")
STRIPE_NAMES = ("0 deg", "45 deg", "90 deg", "135 deg")
NONLOCAL_CLASSES = ("different", "same")
# Saturated colours far from the dark noise and from each other (RGB).
PALETTE = torch.tensor([[230, 40, 40], [40, 200, 40], [50, 80, 240], [240, 220, 40], [220, 60, 220], [40, 220, 230]],
                       dtype=torch.uint8)
TEST_FRACTION = 0.25


def image_counts(size: int) -> tuple[int, int]:
    """(train, test) image counts at size S: fixed up to 64, then bounded by memory."""
    budget = (130 * 2**20) // (3 * size * size)
    train = max(400, min(3000, int(budget / (1 + TEST_FRACTION))))
    return train, max(100, int(train * TEST_FRACTION))


def _pixel_grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.arange(size, dtype=torch.float32) + 0.5
    return centres.view(1, size, 1), centres.view(1, 1, size)


def shape_masks(labels: torch.Tensor, centre_y: torch.Tensor, centre_x: torch.Tensor, radius: torch.Tensor,
                size: int) -> torch.Tensor:
    """(N, S, S) boolean masks of each image's shape (see the module docstring)."""
    rows, cols = _pixel_grid(size)
    dy = rows - centre_y.view(-1, 1, 1)
    dx = cols - centre_x.view(-1, 1, 1)
    r = radius.view(-1, 1, 1)
    distance = torch.sqrt(dy**2 + dx**2)
    half_width = torch.clamp(0.3 * r, min=0.5)
    masks = torch.stack([
        distance <= r,
        torch.maximum(dy.abs(), dx.abs()) <= 0.8 * r,
        (dy >= -r) & (dy <= 0.7 * r) & (dx.abs() <= 0.6 * (dy + r)),
        ((dy.abs() <= half_width) & (dx.abs() <= r)) | ((dx.abs() <= half_width) & (dy.abs() <= r)),
        (distance <= r) & (distance >= 0.55 * r),
    ])  # (K, N, S, S)
    return masks[labels, torch.arange(len(labels))]


def generate_shapes(size: int, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` shapes-S images (uint8, N x 3 x S x S) and labels, from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(SHAPE_NAMES), (count,), generator=generator)
    radius = torch.clamp(size * (0.18 + 0.12 * torch.rand(count, generator=generator)), min=1.5)
    radius = torch.minimum(radius, torch.tensor(size / 2))
    # Centre uniform over the positions that keep the shape inside the image.
    centre_y = radius + (size - 2 * radius) * torch.rand(count, generator=generator)
    centre_x = radius + (size - 2 * radius) * torch.rand(count, generator=generator)
    colour = torch.randint(128, 256, (count, 3, 1, 1), generator=generator, dtype=torch.uint8)
    images = torch.randint(0, 128, (count, 3, size, size), generator=generator, dtype=torch.uint8)
    # Masks in chunks: their float intermediates are 4x the images' size.
    chunk = max(1, 2**22 // (size * size))
    for start in range(0, count, chunk):
        part = slice(start, start + chunk)
        masks = shape_masks(labels[part], centre_y[part], centre_x[part], radius[part], size).unsqueeze(1)
        images[part] = torch.where(masks, colour[part], images[part])
    return images, labels


def generate_stripes(size: int, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` stripes-S images (uint8, N x 3 x S x S) and orientation labels, from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(STRIPE_NAMES), (count,), generator=generator)
    angle = labels.to(torch.float64) * (torch.pi / len(STRIPE_NAMES))
    period = 3 + 3 * torch.rand(count, generator=generator, dtype=torch.float64)
    phase = 2 * torch.pi * torch.rand(count, generator=generator, dtype=torch.float64)
    dark = torch.randint(0, 256, (count, 3), generator=generator).to(torch.float64)
    light = torch.randint(0, 256, (count, 3), generator=generator).to(torch.float64)
    # Keep the two colours at least 96 apart in their mean, so every grating is visible.
    gap = (light - dark).mean(1, keepdim=True)
    push = torch.clamp(96 - gap.abs(), min=0) * torch.where(gap >= 0, 1.0, -1.0) / 2
    dark, light = (dark - push).clamp(0, 255), (light + push).clamp(0, 255)
    rows, cols = (grid.to(torch.float64) for grid in _pixel_grid(size))
    # Distance along the grating's normal: stripes at angle a run along (cos a, -sin a).
    across = rows * torch.cos(angle).view(-1, 1, 1) + cols * torch.sin(angle).view(-1, 1, 1)
    profile = 0.5 + 0.5 * torch.sin(2 * torch.pi * across / period.view(-1, 1, 1) + phase.view(-1, 1, 1))
    images = dark.view(count, 3, 1, 1) + (light - dark).view(count, 3, 1, 1) * profile.unsqueeze(1)
    noise = torch.randint(-32, 33, (count, 3, size, size), generator=generator).to(torch.float64)
    return (images + noise).round().clamp(0, 255).to(torch.uint8), labels


def nonlocal_layout(size: int) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """(patch side q, top-left corner of A, top-left corner of B)."""
    side = max(1, size // 8)
    inset = size // 16
    return side, (inset, inset), (size - inset - side, size - inset - side)


def generate_nonlocal(size: int, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` nonlocal-S images (uint8, N x 3 x S x S) and same/different labels, from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    side, corner_a, corner_b = nonlocal_layout(size)
    images = torch.randint(0, 64, (count, 3, size, size), generator=generator, dtype=torch.uint8)
    # Distractors first, so the two fixed patches are drawn on top of anything near them.
    positions = torch.arange(size - side + 1)
    top, left = torch.meshgrid(positions, positions, indexing="ij")
    top, left = top.flatten(), left.flatten()

    def clear_of(corner: tuple[int, int]) -> torch.Tensor:
        return (top >= corner[0] + side) | (top + side <= corner[0]) | (left >= corner[1] + side) | (left + side <= corner[1])

    allowed = clear_of(corner_a) & clear_of(corner_b)
    allowed_top, allowed_left = top[allowed], left[allowed]
    distractors = round(size * size / 64) if len(allowed_top) else 0
    if distractors:
        choice = torch.randint(0, len(allowed_top), (count, distractors), generator=generator)
        colours = torch.randint(0, len(PALETTE), (count, distractors), generator=generator)
        rows = allowed_top[choice].view(count, distractors, 1, 1) + torch.arange(side).view(1, 1, side, 1)
        cols = allowed_left[choice].view(count, distractors, 1, 1) + torch.arange(side).view(1, 1, 1, side)
        rows, cols = rows.expand(-1, -1, side, side), cols.expand(-1, -1, side, side)
        batch = torch.arange(count).view(count, 1, 1, 1).expand_as(rows)
        fill = PALETTE[colours].view(count, distractors, 1, 1, 3).expand(-1, -1, side, side, -1)
        for channel in range(3):
            images[batch, channel, rows, cols] = fill[..., channel]
    labels = torch.randint(0, 2, (count,), generator=generator)
    colour_a = torch.randint(0, len(PALETTE), (count,), generator=generator)
    # `different`: B's colour is uniform over the other palette entries, so B alone is uniform too.
    offset = torch.randint(1, len(PALETTE), (count,), generator=generator)
    colour_b = torch.where(labels == 1, colour_a, (colour_a + offset) % len(PALETTE))
    for corner, colour in ((corner_a, colour_a), (corner_b, colour_b)):
        images[:, :, corner[0]:corner[0] + side, corner[1]:corner[1] + side] = PALETTE[colour].view(count, 3, 1, 1)
    return images, labels


def _generated(name: str, size: int, generate, class_names: tuple[str, ...], defaults: DataDefaults) -> ImageDataset:
    """A generated set at size S: its images drawn with GENERATOR_SEED, split train / test."""
    train, test = image_counts(size)
    images, labels = generate(size, train + test, GENERATOR_SEED)
    return make_dataset(name, images[:train], labels[:train], images[train:], labels[train:],
                        class_names=list(class_names), **defaults.augmentation())


# Flips and shifts keep every shape what it is (the triangle points up either way).
SHAPES_DEFAULTS = DataDefaults(hflip=True, crop_padding=None)
# No flips or shifts: they would move the two fixed patches and break the relation.
NONLOCAL_DEFAULTS = DataDefaults(hflip=False, crop_padding=0)


@register_dataset("shapes", "generated: 5 shape classes at random position, scale and colour over noise (local label)",
                  sized=True, defaults=SHAPES_DEFAULTS)
def load_shapes(size: int, options: DataOptions) -> ImageDataset:
    return _generated(f"shapes-{size}", size, generate_shapes, SHAPE_NAMES, SHAPES_DEFAULTS)


# Flips would swap 45 and 135 degrees; shifts keep every grating what it is.
STRIPES_DEFAULTS = DataDefaults(hflip=False, crop_padding=None)


@register_dataset("stripes", "generated: orientation of a grating at random phase and period over noise "
                  "(local label, in every 3 x 3 window)", sized=True, defaults=STRIPES_DEFAULTS)
def load_stripes(size: int, options: DataOptions) -> ImageDataset:
    return _generated(f"stripes-{size}", size, generate_stripes, STRIPE_NAMES, STRIPES_DEFAULTS)


@register_dataset("nonlocal", "generated: same/different colour of two fixed distant patches, among distractors "
                  "(no local label)", sized=True, defaults=NONLOCAL_DEFAULTS)
def load_nonlocal(size: int, options: DataOptions) -> ImageDataset:
    return _generated(f"nonlocal-{size}", size, generate_nonlocal, NONLOCAL_CLASSES, NONLOCAL_DEFAULTS)

"""Decoding image files (PNG, JPEG, ... through Pillow) into one uint8 tensor.

Every loader that reads image files (`folder:`, `hf:`, `tiny-imagenet`, `imagenet`) goes
through `decode_images`, so they share one behaviour:

- Resizing: the shorter side to `size`, then a centre crop to size x size (torchvision's
  Resize + CenterCrop on the PIL image, antialiased); no distortion of the aspect ratio.
  A JPEG is first decoded at the smallest DCT scale that still covers `size` (Pillow's
  `draft`), which makes ImageNet-sized JPEGs several times faster to read.
- Channels: one (grey) when every image is greyscale, else three (RGB; grey images are
  replicated into three channels, as Pillow's convert("RGB") does).
- Bad files: a file Pillow cannot read, a truncated file and a decompression bomb (more
  pixels than Pillow's MAX_IMAGE_PIXELS guard allows) each end the load with one UserError
  naming the file.
- Speed: files are decoded on a pool of threads (Pillow releases the GIL while decoding and
  resizing), into one preallocated tensor.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Union

import numpy as np
import torch

from localitylab.errors import UserError

# A source is a path to open, or the file's bytes (an archive member, a Parquet cell).
Source = Union[str, Path, bytes]

GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})


def decode_one(name: str, source: Source, size: int | None) -> np.ndarray:
    """One image as (H, W) uint8 if greyscale, else (H, W, 3); resized when `size` is given."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import functional as TF

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            if size and img.format == "JPEG":
                img.draft(None, (size, size))  # DCT scaling: the result still covers size x size
            if img.mode.startswith("I;16"):
                img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8))
            img = img.convert("L" if img.mode in GREY_MODES else "RGB")
            if size:
                img = TF.center_crop(TF.resize(img, size), [size, size])
            return np.asarray(img, dtype=np.uint8)
    except Image.DecompressionBombError as err:
        raise UserError(f"{name} is refused as a possible decompression bomb: {err}") from None
    except FileNotFoundError:
        raise UserError(f"{name} is missing") from None
    # What Pillow raises for a file that is not an image, is truncated, or is corrupt inside.
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as err:
        raise UserError(f"{name} is not a readable image: {err}") from None


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(what: str, count: int, size: int, chans: int = 3) -> None:
    """Refuse, before decoding anything, a data set that could not be held in memory."""
    total = physical_memory()
    needed = count * chans * size * size
    if total is not None and needed > 0.8 * total:
        raise UserError(
            f"{what}: {count:,} images at {size}x{size} are {needed / 2**30:.1f} GiB as uint8, more than this "
            f"machine's memory ({total / 2**30:.1f} GiB) allows; localitylab holds a data set in memory, so "
            f"choose a smaller img_size", setting="img_size"
        )


def decode_images(sources: Iterable[tuple[str, Source]], count: int, size: int | None, what: str,
                  workers: int | None = None) -> torch.Tensor:
    """Decode `count` images, given as (name for errors, path or bytes), into (N, C, S, S) uint8.

    Without `size`, every image must already have the size of the first one. The first bad
    file in order raises; nothing is returned half-filled.
    """
    if size:
        check_fits(what, count, size)
    workers = workers or min(32, os.cpu_count() or 1)
    out: np.ndarray | None = None
    grey = np.zeros(count, dtype=bool)
    first_name = None
    index = 0

    def place(name: str, array: np.ndarray) -> None:
        nonlocal out, first_name
        if index >= count:
            raise UserError(f"{what}: more than the {count} images expected ({name} is one too many)")
        if out is None:
            height, width = array.shape[:2]
            if height != width and not size:
                raise UserError(f"{name} is {width}x{height}, not square: give img_size to resize and centre-crop",
                                setting="img_size")
            check_fits(what, count, height)
            out = np.empty((count, 3, height, width), dtype=np.uint8)
            first_name = name
        if array.shape[:2] != out.shape[2:]:
            raise UserError(f"{name} is {array.shape[1]}x{array.shape[0]}, but {first_name} is "
                            f"{out.shape[3]}x{out.shape[2]}: give img_size to resize them all", setting="img_size")
        if array.ndim == 2:
            out[index] = array[None]
            grey[index] = True
        else:
            out[index] = array.transpose(2, 0, 1)

    # A bounded window of work in flight: archives are read in the calling thread while the
    # pool decodes, without holding more than a few hundred files' bytes at once.
    window = 8 * workers
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending: deque[tuple[str, Future]] = deque()
        try:
            for name, source in sources:
                pending.append((name, pool.submit(decode_one, name, source, size)))
                while len(pending) >= window:
                    done_name, future = pending.popleft()
                    place(done_name, future.result())
                    index += 1
            while pending:
                done_name, future = pending.popleft()
                place(done_name, future.result())
                index += 1
        except BaseException:
            for _, future in pending:
                future.cancel()
            raise
    if index != count:
        raise UserError(f"{what}: expected {count} images, found {index}")
    if out is None:
        raise UserError(f"{what} holds no images")
    images = torch.from_numpy(out)
    return images[:, :1].clone() if grey.all() else images

"""Bad image files the tests write: a decompression bomb and a truncated JPEG."""

from __future__ import annotations

import functools
import io
import struct
import zlib

import numpy as np


@functools.lru_cache(maxsize=1)
def bomb_png() -> bytes:
    """A valid PNG of 40,000 x 40,000 black pixels (1.6 billion; one bit each) that is ~190 KB
    on disk: decoded, it would take 1.6 GB as greyscale bytes, 4.8 GB as RGB. Made once a session."""
    width = height = 40_000
    rows = (b"\x00" * (1 + width // 8)) * 1000  # filter byte 0, then the row's bits
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(rows) for _ in range(height // 1000)) + packer.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def truncated_jpeg() -> bytes:
    """A 32x32 JPEG cut off half-way through its compressed data."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]

"""Files of the official data sets: where they live, their checksums, and fetching them.

Every loader finds its files under one data folder (`data_dir`, else
$LOCALITYLAB_DATA_DIR, else ~/.cache/localitylab/data), in the layout torchvision uses for
the same data set, so a folder torchvision already filled works as it is. Downloads go to a
temporary name and appear under their own name only once their MD5 matches.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from localitylab.errors import UserError
from localitylab.io import atomic_path


def default_data_dir() -> Path:
    return Path(os.environ.get("LOCALITYLAB_DATA_DIR", Path.home() / ".cache" / "localitylab" / "data"))


def data_root(data_dir: Path | str | None) -> Path:
    return Path(data_dir).expanduser() if data_dir else default_data_dir()


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_md5(path: Path, expected: str | None) -> None:
    """Refuse a file whose MD5 is not `expected` (None: no check)."""
    if expected is None:
        return
    got = md5_of(path)
    if got != expected:
        raise UserError(f"{path} has MD5 {got}, expected {expected}: the file is damaged or not the official one")


def download(url: str, dest: Path, md5: str) -> Path:
    """Fetch `url` to `dest`, checking its MD5 before the file appears under its name."""
    try:
        with atomic_path(dest) as tmp:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
            got = md5_of(tmp)
            if got != md5:
                raise UserError(f"download of {url} has MD5 {got}, expected {md5}; nothing was kept")
    except (urllib.error.URLError, OSError) as err:
        raise UserError(f"could not download {url}: {err}; put {dest.name} in {dest.parent} by hand") from None
    return dest


def download_first(urls: list[str], dest: Path, md5: str) -> Path:
    """Try each mirror in turn; the error names every one that failed."""
    failures = []
    for url in urls:
        try:
            return download(url, dest, md5)
        except UserError as err:
            failures.append(str(err))
    raise UserError("; ".join(failures))


class HashingReader:
    """A read-only file object that hashes what passes through it, so a single pass over an
    archive (tarfile in stream mode) both reads its members and checks its MD5."""

    def __init__(self, handle: BinaryIO):
        self.handle = handle
        self.digest = hashlib.md5()

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        return data

    def finish(self) -> str:
        """Hash whatever the reader did not consume (a tar's zero padding) and return the MD5."""
        while chunk := self.handle.read(1 << 20):
            self.digest.update(chunk)
        return self.digest.hexdigest()


def file_stamp(path: Path) -> tuple[str, int, int]:
    """(path, size, modification time in ns): what the decoded-image cache is keyed by."""
    try:
        stat = path.stat()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    return str(path), stat.st_size, stat.st_mtime_ns

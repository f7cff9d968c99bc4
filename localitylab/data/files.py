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
import urllib.parse
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


class DownloadFailed(UserError):
    """A download that did not happen; `offline`: the host's name did not resolve (no network)."""

    def __init__(self, message: str, reason: str = "", offline: bool = False) -> None:
        super().__init__(message)
        self.reason = reason or message
        self.offline = offline


# Set once a host name failed to resolve: with no network every later download fails the same
# way, so none is tried again in this process (no minute of retries against no network).
_NO_NETWORK: list[str] = []


def download(url: str, dest: Path, md5: str) -> Path:
    """Fetch `url` to `dest`, checking its MD5 before the file appears under its name."""
    import socket

    if _NO_NETWORK:
        raise DownloadFailed(f"could not download {url}: no network ({_NO_NETWORK[0]}); put {dest.name} in "
                             f"{dest.parent} by hand", f"no network ({_NO_NETWORK[0]})", offline=True)
    try:
        with atomic_path(dest) as tmp:
            with urllib.request.urlopen(url, timeout=20) as response, open(tmp, "wb") as out:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
            got = md5_of(tmp)
            if got != md5:
                raise UserError(f"download of {url} has MD5 {got}, expected {md5}; nothing was kept")
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        offline = isinstance(reason, socket.gaierror)
        if offline:
            _NO_NETWORK.append(f"the name of {urllib.parse.urlsplit(url).hostname} did not resolve")
        raise DownloadFailed(f"could not download {url}: {reason}; put {dest.name} in {dest.parent} by hand",
                             str(reason), offline) from None
    return dest


def download_first(urls: list[str], dest: Path, md5: str) -> Path:
    """Try each mirror in turn (none once the network is found missing); the one-line error
    names what failed and says once where to put the file by hand."""
    failures = []
    for url in urls:
        try:
            return download(url, dest, md5)
        except UserError as err:  # no connection, or a file with another MD5
            failures.append(f"{url}: {getattr(err, 'reason', err)}")
            if getattr(err, "offline", False):
                break
    raise DownloadFailed(f"could not download {dest.name} ({'; '.join(failures)}); put it in {dest.parent} by hand",
                         "; ".join(failures), offline=bool(_NO_NETWORK))


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

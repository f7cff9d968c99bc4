"""Atomic file writes: a reader never sees a half-written file.

Every file localitylab writes goes to a temporary name in the same folder and is renamed
into place (rename is atomic on POSIX within one file system).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def check_folder(folder: str | os.PathLike) -> Path:
    """Raise UserError if `folder` could not be a folder to write into: it, or the nearest
    part of it that exists, is a file. Creates nothing (a failed command leaves no folder)."""
    from localitylab.errors import UserError

    folder = Path(folder)
    for part in (folder, *folder.parents):
        if part.exists():
            if not part.is_dir():
                what = "is a file" if part == folder else f"lies under {part}, which is a file"
                raise UserError(f"cannot write into {folder}: it {what}, not a folder")
            break
    return folder


def make_folder(folder: str | os.PathLike) -> Path:
    """mkdir -p, with a one-line UserError where a file is in the way or permission is refused."""
    from localitylab.errors import UserError

    folder = check_folder(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the folder {folder}: {err.strerror or err}") from None
    return folder


LOCK_NAME = ".lock"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, command: str) -> Iterator[Path]:
    """Hold an OS lock (flock) on `folder` while a run writes it; a second holder is refused
    at once with one line naming the first (its command, pid and host, from the lock file).

    The kernel releases the lock when its process ends, however it ends (SIGKILL too), so a
    lock file a killed run left behind blocks nothing. On release the lock file is removed
    (while still held: a process that opened it meanwhile sees that the file it locked is no
    longer the folder's and tries again), and so is the folder if this call created it and
    nothing was written into it."""
    import fcntl
    import socket
    import time

    from localitylab.errors import UserError

    folder = Path(folder)
    created = next((part for part in reversed((folder, *folder.parents)) if not part.exists()), None)
    folder = make_folder(folder)
    path = folder / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise UserError(f"cannot lock the folder {folder}: {err.strerror or err}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise UserError(f"{folder} is in use by {holder}; wait for that run to end, or choose another folder"
                            ) from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed this file as it let go: lock the folder's new one
    try:
        about = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(about) + "\n").encode(), 0)
        yield folder
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
        if created is not None:
            for part in (folder, *folder.parents):
                with contextlib.suppress(OSError):
                    part.rmdir()  # only if empty: nothing was written
                if part == created:
                    break


def _lock_holder(fd: int) -> str:
    """'pid 123 on host (localitylab train ...), since ...' from a held lock file."""
    try:
        about = json.loads(os.pread(fd, 65536, 0).decode() or "{}")
        return (f"pid {about['pid']} on {about['host']} ({about['command']}), since {about['since']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (starting)"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`."""
    path = Path(path)
    make_folder(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # fsync before rename so a power cut cannot leave an empty file under the real name.
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        # mkstemp creates 0600; give the file the mode an ordinary open() would (umask).
        os.chmod(tmp_path, 0o666 & ~_current_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Call `writer(tmp_path)` and move the result onto `path`."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def safe_torch_load(path: str | Path) -> Any:
    """torch.load with weights_only=True; any failure is a one-line UserError.

    weights_only refuses every pickle global outside torch's allow-list, so a file whose
    unpickling would run code is rejected before anything runs.
    """
    import pickle
    import re
    import warnings
    import zipfile

    import torch

    from localitylab.errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about old pickle protocols; the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only names the global it refused ("GLOBAL posix.system", or for protocol 4
        # pickles "STACK_GLOBAL" with the name beside it); anything else is a file that is
        # simply not a torch checkpoint.
        refused = re.search(r"GLOBAL ([\w.]+)", str(err)) or re.search(r"STACK_GLOBAL.*?([\w]+\.[\w.]+)", str(err))
        if refused:
            raise UserError(
                f"{path} was refused: loading it would call {refused.group(1)}, and a checkpoint holds only "
                f"tensors and plain values; nothing was run"
            ) from None
        raise UserError(f"{path} is not a readable checkpoint (truncated or not a torch file)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, IndexError) as err:
        raise UserError(f"{path} is not a readable checkpoint: {_unreadable_reason(path, err)}") from None


def _unreadable_reason(path: Path, err: BaseException) -> str:
    """Why torch could not read a file, in words: cut short, not a torch file, or torch's own first line."""
    size = path.stat().st_size
    head = path.read_bytes()[:4] if size else b""
    text = " ".join(str(err).split())
    if not size:
        return "the file is empty"
    if isinstance(err, EOFError) or "central directory" in text or "end of file" in text.lower():
        return f"it is cut short ({size:,} bytes; a torch file that ends early)"
    if head[:2] == b"PK":
        return f"its torch archive is damaged ({text[:160] or type(err).__name__})"
    return "it is not a torch file (truncated, or another format)"


def safe_name(name: str) -> str:
    """A file-name-safe version of a user-supplied name: no separators, no '..'."""
    import re

    cleaned = re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip(".-")
    return cleaned or "run"


def code_version() -> dict[str, Any]:
    """The git commit of the localitylab code that is running (None outside a checkout)."""
    import subprocess

    global _CODE_VERSION
    if _CODE_VERSION is None:
        root = Path(__file__).resolve().parents[1]
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=10).stdout.strip()
            # -z: the porcelain format (stable, whatever the user's git settings), NUL-separated
            dirty = subprocess.run(["git", "-C", str(root), "status", "-z", "--", "localitylab"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            _CODE_VERSION = {"git_commit": commit or None, "git_dirty": bool(dirty) if commit else None}
        except (OSError, subprocess.SubprocessError):
            _CODE_VERSION = {"git_commit": None, "git_dirty": None}
    return _CODE_VERSION


_CODE_VERSION: dict[str, Any] | None = None

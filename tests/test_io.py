"""Atomic writes: nothing half-written, and files with the mode an ordinary write gives."""

import os

import pytest

from localitylab.io import atomic_path, write_text


def test_written_files_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_text(tmp_path / "a.txt", "hello")
        plain = tmp_path / "b.txt"
        plain.write_text("hello")
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777) == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = write_text(tmp_path / "table.csv", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]

"""Atomic writes: a failed write leaves the old file and no temporary behind."""

from __future__ import annotations

import pytest

from meanflow.fileio import atomic_path, atomic_write_text, file_sha256


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    dest = tmp_path / "out.npz"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".npz"  # writers infer the format
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz"]


def test_successful_write_replaces_and_hashes(tmp_path):
    dest = tmp_path / "sub" / "a.txt"
    atomic_write_text(dest, "hello\n")
    assert dest.read_text() == "hello\n"
    assert file_sha256(dest) == "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"

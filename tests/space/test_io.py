"""Atomic writes: the target is replaced whole or not at all."""

from __future__ import annotations

import stat

import pytest

from space.files import atomic_path, atomic_write


def test_atomic_write_creates_folders_and_replaces(tmp_path) -> None:
    target = tmp_path / "a" / "b" / "out.json"
    atomic_write(target, "first\n")
    atomic_write(target, b"second\n", mode=0o644)
    assert target.read_text() == "second\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]  # no temporary left


def test_failed_block_leaves_the_old_file_and_no_temporary(tmp_path) -> None:
    target = tmp_path / "weights.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="exporter broke"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half a file")
        raise RuntimeError("exporter broke")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]

"""runtime.atomic: the one file writer behind bundles, checkpoints and engine caches."""

from __future__ import annotations

import pytest

from msn_edge.runtime.atomic import atomic_writer, write_atomic


def test_a_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"old")
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_writer(path) as f:
        f.write(b"half of the new")
        raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_no_file_appears_until_the_write_is_complete(tmp_path):
    path = tmp_path / "x.bin"
    with atomic_writer(path) as f:
        f.write(b"data")
        assert not path.exists()  # readers never see a partial file
    assert path.read_bytes() == b"data"

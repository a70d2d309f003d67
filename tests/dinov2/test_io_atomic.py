"""dinov2.io.atomic: the one atomic-write helper (temp file in the same folder, fsync, rename, folder fsync)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dinov2.io.atomic import atomic_path, write_atomic, write_bytes_atomic, write_text_atomic


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_writes_create_parents_and_replace_old_content(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "file.txt"
    write_text_atomic(target, "first\n")
    write_bytes_atomic(target, b"second\n")
    assert target.read_bytes() == b"second\n"
    write_atomic(target, lambda f: f.write(b"third"))
    assert target.read_bytes() == b"third"
    assert _leftovers(target.parent) == []


def test_a_failing_writer_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "state.pth"
    target.write_bytes(b"old")

    def torn(f) -> None:
        f.write(b"half of the new")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed"):
        write_atomic(target, torn)
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_atomic_path_is_a_hidden_sibling_published_on_exit(tmp_path: Path) -> None:
    target = tmp_path / "features.npy"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".features.npy.") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"complete")
        assert not target.exists()  # nothing carries the final name before the block ends
    assert target.read_bytes() == b"complete" and not tmp.exists()


def test_files_get_the_default_permissions(tmp_path: Path) -> None:
    # A checkpoint or shard must stay readable by the group like any file written with open(): 0o666 minus umask.
    umask = os.umask(0o022)
    try:
        write_bytes_atomic(tmp_path / "shared.bin", b"x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "shared.bin").stat().st_mode) == 0o644

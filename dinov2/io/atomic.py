"""Atomic file writes: after a crash, a file holds either its previous content or the complete new one.

The new bytes go to a temporary file in the target's folder (the same file system, so the rename is atomic), which
is fsynced and renamed over the target; then the folder itself is fsynced so that the rename survives a power loss
too (rename(2) is atomic but only durable once the directory entry is on disk). Temporary names are
``.<name>.<random>.tmp``: hidden, never mistaken for a finished file, and easy to sweep (curation's shard resume
deletes them).
"""

from __future__ import annotations

import io
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

TMP_SUFFIX = ".tmp"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_temp(path: Path) -> Path:
    """Creates an empty temporary file next to ``path`` (default permissions, as a plain ``open`` would give)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def publish(tmp: str | Path, path: str | Path) -> None:
    """Makes the finished file ``tmp`` durable and renames it over ``path`` (same folder), then syncs the folder."""
    tmp, path = Path(tmp), Path(path)
    _fsync_path(tmp)
    os.replace(tmp, path)
    _fsync_path(path.parent)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to ``path`` for any writer that wants a file name (memory maps, Parquet, TorchScript).

    When the block ends normally the file is published at ``path`` (:func:`publish`); when it raises, the temporary
    file is removed and ``path`` is left as it was. The parent folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(path)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _ErrorRecorder(io.RawIOBase):
    """A writable file wrapper that keeps the first OSError of its ``write``: ``torch.save`` reports a full disk as
    ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``, and the errno is what the user needs."""

    def __init__(self, file: BinaryIO, path: Path) -> None:
        super().__init__()
        self.file, self.path = file, path
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            if error.filename is None:
                error.filename = str(self.path)
            self.error = self.error or error
            raise


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Atomically writes whatever ``write(file)`` writes into the binary file object it is given.

    Raises:
        OSError: naming the file, for a full disk, a quota, a size limit... also where the writer (``torch.save``)
            hid it behind another exception.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        recorder = _ErrorRecorder(f, Path(path))
        try:
            write(recorder)
        except Exception as error:
            if recorder.error is not None and recorder.error is not error:
                raise recorder.error from error
            raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Atomically writes ``data``."""
    write_atomic(path, lambda f: f.write(data))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Atomically writes ``text`` as UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"))

"""Reading user files without hanging: a loop-free folder walk, a regular-file check before every open, bounded reads,
and a lossless text form for file names that are not UTF-8.

Links. ``walk_folder`` lists each file once. It first walks the real folders (never through a link), then follows
the links it met, in name order: a link to a folder is entered only when that folder (by ``(st_dev, st_ino)``) has
not been listed yet, so a loop or a ``..`` link adds nothing, and a link to a file is listed only when that file (by
``(st_dev, st_ino)``, which also covers hard links) has not been listed yet. What a link adds keeps the link's path.
Skipped links, broken links and non-regular files (FIFOs, sockets, devices) come back as entries with a reason, so
a caller can count them, and none of them is ever opened.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections import deque
from typing import BinaryIO, NamedTuple

# Every read of user data is bounded: no image, tar member or file list the project reads is larger.
MAX_FILE_BYTES = 512 * 1024 * 1024
# A POSIX file name never holds NUL, so an escaped name (see `escape_name`) can never equal a real one.
ESCAPE_MARK = "\0"
_UNESCAPE = re.compile(rb"\\(\\|x[0-9a-f]{2})")


class UnsafeFile(OSError):
    """A file the project refuses to open or read; ``reason`` is a short code (``fifo``, ``too_large`` ...)."""

    def __init__(self, reason: str, path: str | os.PathLike | bytes, detail: str = "") -> None:
        super().__init__(f"{escape_name(os.fsdecode(path))}: {reason}" + (f" ({detail})" if detail else ""))
        self.reason = reason


def file_kind(mode: int) -> str:
    """'' for a regular file, else why it must not be read as data (``fifo``, ``socket``, ``device``, ``folder``)."""
    if stat.S_ISREG(mode):
        return ""
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISDIR(mode):
        return "folder"
    return "not_a_regular_file"


def open_regular(path: str | os.PathLike | bytes) -> BinaryIO:
    """Open a regular file for reading; anything else is refused before a single byte is read.

    ``O_NONBLOCK`` makes opening a FIFO return at once (a plain open blocks until a writer appears), and the check
    is made on the opened descriptor, so a file swapped for a FIFO after a listing is still caught.

    Raises:
        UnsafeFile: for a FIFO, socket, device or folder.
        OSError: when the file cannot be opened (missing, permissions).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        kind = file_kind(os.fstat(fd).st_mode)
        if kind:
            raise UnsafeFile(kind, path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike | bytes, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """All bytes of a regular file of at most ``max_bytes``.

    Raises:
        UnsafeFile: not a regular file, or ``too_large``.
        OSError: unreadable.
    """
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise UnsafeFile("too_large", path, f"{size} bytes > {max_bytes}")
        # One byte more than the size says: a file still growing cannot push the read past the bound (and read(n)
        # allocates n bytes up front, so n must be the size, not the bound).
        data = f.read(size + 1)
    if len(data) > max_bytes:
        raise UnsafeFile("too_large", path, f"more than {max_bytes} bytes")
    return data


def read_head(path: str | os.PathLike | bytes, n: int = 64) -> bytes:
    """The first ``n`` bytes of a regular file (for magic-byte sniffing). Raises as :func:`open_regular`."""
    with open_regular(path) as f:
        return f.read(n)


def escape_name(name: str) -> str:
    """A file name as valid UTF-8 text, losslessly: unchanged when it is valid UTF-8; otherwise ``ESCAPE_MARK``
    followed by its bytes with ``\\`` doubled and each byte that is not UTF-8 written ``\\xNN``.

    Names that are not UTF-8 reach Python as ``surrogateescape`` strings, which Parquet and JSON writers refuse.
    """
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        raw = os.fsencode(name).replace(b"\\", b"\\\\")
        return ESCAPE_MARK + raw.decode("utf-8", "backslashreplace")


def unescape_name(text: str) -> str:
    """Inverse of :func:`escape_name`: the name as the OS gives it (``surrogateescape`` for non-UTF-8 bytes)."""
    if not text.startswith(ESCAPE_MARK):
        return text
    body = text[len(ESCAPE_MARK):].encode("utf-8")
    raw = _UNESCAPE.sub(lambda m: b"\\" if m.group(1) == b"\\" else bytes([int(m.group(1)[1:], 16)]), body)
    return os.fsdecode(raw)


class WalkEntry(NamedTuple):
    """One entry met by :func:`walk_folder`.

    Attributes:
        path: the path to open (through the link it was reached by, if any).
        rel: path relative to the walked root, ``/``-separated.
        reason: '' for a listed regular file; else why it is not listed: ``fifo``, ``socket``, ``device``,
            ``broken_link``, ``link_loop``, ``unreadable`` (a folder or entry that cannot be read),
            ``link_to_listed_file`` or ``link_to_listed_folder`` (already listed through another path).
        size: bytes (regular files).
        mtime_ns: modification time (regular files).
    """

    path: str
    rel: str
    reason: str
    size: int = 0
    mtime_ns: int = 0


class _Walker:
    """State of one :func:`walk_folder` call: what has been listed, by device and inode."""

    def __init__(self, with_stat: bool) -> None:
        self.with_stat = with_stat
        self.dirs: set[tuple[int, int]] = set()
        self.files: set[tuple[int, int]] = set()
        self.entries: list[WalkEntry] = []
        self.links: deque[tuple[str, str]] = deque()

    def add_file(self, path: str, rel: str, key: tuple[int, int], st: os.stat_result | None) -> None:
        """A non-folder entry; ``st`` is None for a regular file known from the folder listing alone."""
        kind = file_kind(st.st_mode) if st is not None else ""
        if kind:
            self.entries.append(WalkEntry(path, rel, kind))
        elif key in self.files:
            self.entries.append(WalkEntry(path, rel, "link_to_listed_file"))
        else:
            self.files.add(key)
            size, mtime_ns = (st.st_size, st.st_mtime_ns) if st is not None else (0, 0)
            self.entries.append(WalkEntry(path, rel, "", size, mtime_ns))

    def scan(self, top: str, top_rel: str) -> None:
        """List the real folders under ``top`` in sorted depth-first order, so that of two hard links the first
        by name wins (iteratively: depth is not bounded by Python's stack)."""
        # (path, rel, None) is a folder to scan; (path, rel, (key, stat or None)) a file met while scanning.
        stack: list[tuple[str, str, tuple | None]] = [(top, top_rel, None)]
        while stack:
            path, rel, file = stack.pop()
            if file is not None:
                self.add_file(path, rel, *file)
                continue
            try:
                dev = os.stat(path).st_dev
                with os.scandir(path) as it:
                    items = sorted(it, key=lambda e: e.name)
            except OSError:
                self.entries.append(WalkEntry(path, rel, "unreadable"))
                continue
            children: list[tuple[str, str, tuple | None]] = []
            for item in items:
                item_rel = f"{rel}/{item.name}" if rel else item.name
                try:
                    if item.is_symlink():
                        self.links.append((item.path, item_rel))
                        continue
                    if not self.with_stat and item.is_file(follow_symlinks=False):
                        # The folder listing's type and inode suffice: no stat per image (millions of them).
                        children.append((item.path, item_rel, ((dev, item.inode()), None)))
                        continue
                    item_st = item.stat(follow_symlinks=False)
                except OSError:
                    self.entries.append(WalkEntry(item.path, item_rel, "unreadable"))
                    continue
                key = (item_st.st_dev, item_st.st_ino)
                if not stat.S_ISDIR(item_st.st_mode):
                    children.append((item.path, item_rel, (key, item_st)))
                elif key in self.dirs:  # a bind mount of a listed folder
                    self.entries.append(WalkEntry(item.path, item_rel, "link_to_listed_folder"))
                else:
                    self.dirs.add(key)
                    children.append((item.path, item_rel, None))
            stack.extend(reversed(children))

    def follow_links(self) -> None:
        while self.links:
            path, rel = self.links.popleft()
            try:
                st = os.stat(path)
            except OSError as exc:
                self.entries.append(WalkEntry(path, rel, "link_loop" if exc.errno == errno.ELOOP else "broken_link"))
                continue
            if not stat.S_ISDIR(st.st_mode):
                self.add_file(path, rel, (st.st_dev, st.st_ino), st)
            elif (st.st_dev, st.st_ino) in self.dirs:
                self.entries.append(WalkEntry(path, rel, "link_to_listed_folder"))
            else:
                self.dirs.add((st.st_dev, st.st_ino))
                self.scan(path, rel)


def walk_folder(root: str | os.PathLike, with_stat: bool = False) -> list[WalkEntry]:
    """Every entry under ``root``, each file once (see the module docstring for links), sorted by ``rel``.

    Nothing is opened: entries are classified from the folder listing and ``stat`` alone, so FIFOs and devices
    cannot block the walk.

    Args:
        root: the folder.
        with_stat: fill ``size`` and ``mtime_ns`` of every listed file (one ``stat`` each); otherwise they are 0.

    Raises:
        ValueError: when ``root`` is not a folder.
    """
    root = os.fspath(root)
    try:
        st = os.stat(root)
    except OSError as exc:
        raise ValueError(f"folder {root!r} does not exist or cannot be read ({exc.strerror})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{root!r} is not a folder")
    walker = _Walker(with_stat)
    walker.dirs.add((st.st_dev, st.st_ino))
    walker.scan(root, "")
    walker.follow_links()
    return sorted(walker.entries, key=lambda e: e.rel)


def check_regular(path: str | os.PathLike | bytes) -> tuple[str, os.stat_result | None]:
    """('' and its stat) for a regular file (links followed), else (reason, None): ``missing``, ``link_loop``,
    ``unreadable`` or a :func:`file_kind` reason. Nothing is opened."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing", None
    except OSError as exc:
        return ("link_loop" if exc.errno == errno.ELOOP else "unreadable"), None
    except ValueError:  # an embedded NUL byte
        return "bad_path", None
    kind = file_kind(st.st_mode)
    return (kind, None) if kind else ("", st)

"""Indexed, random-access views over training images: an image folder, a file list, or WebDataset ``.tar`` shards.

Every source has the same small interface: ``len(source)``, ``source.read_bytes(i) -> bytes`` and
``source.key(i) -> str``, with a deterministic (sorted) order. Sources are cheap to pickle (open file handles are
dropped and reopened lazily), so they can be handed to DataLoader workers.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from pathlib import Path
from typing import IO, Protocol, runtime_checkable

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
# Preference order when one WebDataset sample holds several images.
_SHARD_IMAGE_EXTS = tuple(ext[1:] for ext in IMAGE_EXTENSIONS)
_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_BRACE_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")
_MAX_OPEN_SHARDS = 64


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..009}`` ranges (zero padding kept) and ``{a,b}`` alternatives, left to right.

    Args:
        pattern: e.g. ``/data/shard-{000000..000009}.tar``.

    Returns:
        The expanded strings, in order (the pattern itself when it has no braces).
    """
    candidates = [m for m in (_BRACE_RANGE.search(pattern), _BRACE_LIST.search(pattern)) if m]
    if not candidates:
        return [pattern]
    match = min(candidates, key=lambda m: m.start())  # leftmost group first, like shell brace expansion
    if match.re is _BRACE_RANGE:
        lo, hi = match.group(1), match.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        values = [str(v).zfill(width) for v in range(int(lo), int(hi) + step, step)]
    else:
        values = match.group(1).split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [out for value in values for out in expand_braces(head + value + tail)]


class ImageFileSource:
    """A fixed list of image files, in the given order.

    Args:
        paths: image file paths.
        root: when given, keys are paths relative to it (posix separators); otherwise keys are the paths.
    """

    def __init__(self, paths: list[str], root: str | None = None) -> None:
        self.paths = [str(p) for p in paths]
        self.root = root

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, root={self.root!r})"

    def key(self, i: int) -> str:
        """Key of image i: its path relative to the root (or the path itself)."""
        path = self.paths[i]
        return Path(os.path.relpath(path, self.root)).as_posix() if self.root else path

    def read_bytes(self, i: int) -> bytes:
        """Raw file bytes of image i."""
        with open(self.paths[i], "rb") as f:
            return f.read()


class ImageFolderSource(ImageFileSource):
    """All image files under a directory (recursive, any layout), sorted by relative path.

    Image extensions (``IMAGE_EXTENSIONS``) match case-insensitively; other files are ignored.

    Args:
        root: the directory.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise ValueError(f"image folder {root!r} does not exist or is not a directory")
        found = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames.sort()
            found.extend(os.path.join(dirpath, name) for name in filenames if _is_image_name(name))
        found.sort(key=lambda p: Path(os.path.relpath(p, root)).as_posix())
        if not found:
            raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}")
        super().__init__(found, root=root)


class TarShardSource:
    """Images inside uncompressed WebDataset ``.tar`` shards, read by random access (seek + read).

    The shards' headers are scanned once at construction. Members are grouped into samples by WebDataset key (the
    member path up to the first dot of its file name); a sample's image is its member whose extension is an image
    extension (``jpg`` first, then ``jpeg``, ``png``, ``webp`` ...); other members (``.json``, ``.cls`` ...) are
    ignored, as are samples without an image. Order: shards in the given order, samples in tar order.

    Args:
        shards: paths of the ``.tar`` files.
    """

    def __init__(self, shards: list[str]) -> None:
        if not shards:
            raise ValueError("TarShardSource needs at least one shard")
        self.shards = [str(s) for s in shards]
        keys: list[str] = []
        shard_ids, offsets, sizes = [], [], []
        for shard_id, shard in enumerate(self.shards):
            for key, offset, size in _scan_shard(shard):
                keys.append(key)
                shard_ids.append(shard_id)
                offsets.append(offset)
                sizes.append(size)
        self.keys = keys
        # Compact arrays: millions of samples cost 20 bytes each, not a Python tuple each.
        self.shard_ids = np.asarray(shard_ids, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images in {len(self.shards)} shards)"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state

    def __del__(self) -> None:
        self._close_all()

    def _close_all(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in getattr(self, "_fds", {}).values():
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._fds = {}

    def _fd(self, shard_id: int) -> int:
        if self._pid != os.getpid():  # forked worker: never share the parent's descriptors
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard_id)
        if fd is None:
            if len(self._fds) >= _MAX_OPEN_SHARDS:
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = os.open(self.shards[shard_id], os.O_RDONLY)
            self._fds[shard_id] = fd
        return fd

    def key(self, i: int) -> str:
        """WebDataset key of sample i (unique within a shard; curated shards keep it unique overall)."""
        return self.keys[i]

    def read_bytes(self, i: int) -> bytes:
        """Raw bytes of sample i's image member."""
        size = int(self.sizes[i])
        data = os.pread(self._fd(int(self.shard_ids[i])), size, int(self.offsets[i]))
        if len(data) != size:
            raise OSError(f"short read in {self.shards[self.shard_ids[i]]}: {len(data)} of {size} bytes")
        return data


def _scan_shard(path: str, fileobj: IO[bytes] | None = None) -> list[tuple[str, int, int]]:
    """(key, data offset, size) of each sample's image member in one uncompressed tar (read from `fileobj` when
    given, e.g. a remote shard; `path` then only names it in errors)."""
    try:
        tar = tarfile.open(path, mode="r:") if fileobj is None else tarfile.open(fileobj=fileobj, mode="r:")
    except tarfile.ReadError as exc:
        raise ValueError(f"{path}: not an uncompressed tar archive ({exc}); random access needs plain .tar") from exc
    images: dict[str, dict[str, tuple[int, int]]] = {}
    with tar:
        for member in tar:
            if not member.isfile():
                continue
            directory, _, name = member.name.rpartition("/")
            stem, dot, ext = name.partition(".")
            if not dot or not stem:
                continue
            key = f"{directory}/{stem}" if directory else stem
            last_ext = ext.rpartition(".")[2].lower()
            if last_ext in _SHARD_IMAGE_EXTS:
                images.setdefault(key, {}).setdefault(last_ext, (member.offset_data, member.size))
    out = []
    for key, by_ext in images.items():  # dicts keep tar order
        ext = min(by_ext, key=_SHARD_IMAGE_EXTS.index)
        out.append((key, *by_ext[ext]))
    return out


def _file_list(path: str) -> list[str]:
    base = os.path.dirname(os.path.abspath(path))
    entries = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                entries.append(line if os.path.isabs(line) else os.path.join(base, line))
    return entries


def _official_dataset_string(spec: str) -> str | None:
    """Map official strings ``ImageNet:root=R[:split=TRAIN]`` / ``ImageNet22k:root=R`` to a folder or shard spec."""
    name, _, rest = spec.partition(":")
    if name not in ("ImageNet", "ImageNet22k") or not rest:
        return None
    options = dict(item.partition("=")[::2] for item in rest.split(":"))
    if "root" not in options:
        raise ValueError(f"dataset string {spec!r} has no root=...; give an image folder or shards instead")
    if name == "ImageNet22k":
        return os.path.join(options["root"], "*.tar")
    split = options.get("split", "TRAIN").lower()
    return os.path.join(options["root"], split)


@runtime_checkable
class ImageSource(Protocol):
    """What the training loader needs from a source: a length, raw bytes and a key per index."""

    def __len__(self) -> int: ...

    def read_bytes(self, i: int) -> bytes: ...

    def key(self, i: int) -> str: ...


def open_source(spec: str) -> ImageSource:
    """Open a training-image source from a string.

    Args:
        spec: one of
            - a directory: every image file under it (:class:`ImageFolderSource`);
            - ``.tar`` shards as a path, glob or brace pattern, e.g. ``/data/shard-{000000..000009}.tar`` or
              ``/data/*.tar`` (:class:`TarShardSource`);
            - a ``.txt`` file listing image paths, or ``.tar`` paths, one per line (relative to the list's folder;
              blank lines and ``#`` comments ignored);
            - the official ``ImageNet:root=R:split=TRAIN`` (folder ``R/train``) or ``ImageNet22k:root=R`` (``R/*.tar``).

    Returns:
        The source.

    Raises:
        ValueError: when nothing matches or the spec has an unknown form.
    """
    official = _official_dataset_string(spec)
    if official is not None:
        return open_source(official)
    if os.path.isdir(spec):
        return ImageFolderSource(spec)
    if spec.lower().endswith(".txt") and os.path.isfile(spec):
        entries = _file_list(spec)
        if not entries:
            raise ValueError(f"file list {spec!r} is empty")
        if all(e.endswith(".tar") for e in entries):
            return TarShardSource(entries)
        missing = [e for e in entries if not os.path.isfile(e)]
        if missing:
            raise ValueError(f"file list {spec!r}: {len(missing)} missing files, e.g. {missing[0]!r}")
        return ImageFileSource(entries, root=os.path.dirname(os.path.abspath(spec)))
    if ".tar" in spec or any(ch in spec for ch in "{*?["):
        paths: list[str] = []
        for pattern in expand_braces(spec):
            matches = sorted(glob.glob(pattern)) if any(ch in pattern for ch in "*?[") else [pattern]
            paths.extend(p for p in matches if os.path.isfile(p))
        if not paths:
            raise ValueError(f"no files match {spec!r}")
        if not all(p.endswith(".tar") for p in paths):
            others = [p for p in paths if not p.endswith(".tar")]
            if all(_is_image_name(p) for p in others) and len(others) == len(paths):
                return ImageFileSource(paths)
            raise ValueError(f"{spec!r} matches files that are neither .tar shards nor images, e.g. {others[0]!r}")
        return TarShardSource(paths)
    raise ValueError(f"dataset {spec!r}: expected an existing directory, .tar shards (glob/braces) or a .txt list")

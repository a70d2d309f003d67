"""Indexed, random-access views over training images: an image folder, a file list, or WebDataset ``.tar`` shards.

Every source has the same small interface: ``len(source)``, ``source.read_bytes(i) -> bytes`` and
``source.key(i) -> str``, with a deterministic (sorted) order. Sources are cheap to pickle (open file handles are
dropped and reopened lazily), so they can be handed to DataLoader workers.

User files never hang or abort a listing: folders are walked without loops (:func:`dinov2.io.files.walk_folder`:
each file once, links followed only to what is not listed yet); FIFOs, sockets and devices are never opened; a file
without an image suffix is listed when its first bytes are an image (:func:`dinov2.io.images.sniff_format`); a
missing or broken entry of a file list or shard list, a non-tar named ``.tar`` and a truncated shard cost only
themselves. What a listing leaves out is logged and kept in ``source.listing_skips`` (reason -> count), which the
trainer adds to its skipped-images counters. Every read is bounded (``dinov2.io.files.MAX_FILE_BYTES``).
"""

from __future__ import annotations

import glob
import logging
import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import IO, Protocol, runtime_checkable

import numpy as np
from braceexpand import braceexpand

from dinov2.io.files import (
    MAX_FILE_BYTES,
    UnsafeFile,
    check_regular,
    open_regular,
    read_head,
    read_regular,
    walk_folder,
)
from dinov2.io.images import IMAGE_SUFFIXES, SAFE_FORMATS, SNIFF_BYTES, sniff_format

logger = logging.getLogger("dinov2")

IMAGE_EXTENSIONS = IMAGE_SUFFIXES
# Preference order when one WebDataset sample holds several images.
_SHARD_IMAGE_EXTS = tuple(ext[1:] for ext in IMAGE_EXTENSIONS)
_MAX_OPEN_SHARDS = 64


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


class ListingSkips:
    """What a listing left out: reason -> count, and a few examples (key, reason) for the log."""

    MAX_EXAMPLES = 5

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: list[tuple[str, str]] = []

    def add(self, key: str, reason: str, count: int = 1) -> None:
        self.counts[reason] += count
        if len(self.examples) < self.MAX_EXAMPLES:
            self.examples.append((key, reason))

    def log(self, what: str) -> None:
        if self.counts:
            reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.counts.items()))
            examples = "; ".join(f"{k!r} ({r})" for k, r in self.examples)
            logger.warning("%s: %d entries not used (%s), e.g. %s", what, sum(self.counts.values()), reasons, examples)


def content_reason(path: str) -> str:
    """'' when a file without an image suffix holds an image the loader may decode, else why it is left out."""
    try:
        found = sniff_format(read_head(path, SNIFF_BYTES))
    except UnsafeFile as exc:
        return exc.reason
    except OSError:
        return "unreadable"
    if found is None:
        return "not_an_image"
    return "" if found in SAFE_FORMATS else "unsupported_format"


class ImageFileSource:
    """A fixed list of image files, in the given order.

    Args:
        paths: image file paths.
        root: when given, keys are paths relative to it (posix separators); otherwise keys are the paths.
    """

    def __init__(self, paths: list[str], root: str | None = None, skips: ListingSkips | None = None) -> None:
        self.paths = [str(p) for p in paths]
        self.root = root
        self.listing_skips: dict[str, int] = dict(skips.counts) if skips else {}

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, root={self.root!r})"

    def key(self, i: int) -> str:
        """Key of image i: its path relative to the root (or the path itself)."""
        path = self.paths[i]
        return Path(os.path.relpath(path, self.root)).as_posix() if self.root else path

    def read_bytes(self, i: int) -> bytes:
        """Raw file bytes of image i (a regular file of at most ``MAX_FILE_BYTES``; else :class:`UnsafeFile`)."""
        return read_regular(self.paths[i], MAX_FILE_BYTES)


class ImageFolderSource(ImageFileSource):
    """All image files under a directory (recursive, any layout, links without loops), sorted by relative path.

    Files with an image suffix (``IMAGE_EXTENSIONS``, any case) are listed; any other regular file is listed when
    its first bytes are an image in ``SAFE_FORMATS`` (a JPEG named ``.jfif`` or with no extension). The rest is
    counted in ``listing_skips`` and logged.

    Args:
        root: the directory.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise ValueError(f"image folder {root!r} does not exist or is not a directory")
        found, skips = [], ListingSkips()
        for entry in walk_folder(root):
            reason = entry.reason or ("" if _is_image_name(entry.rel) else content_reason(entry.path))
            if reason:
                skips.add(entry.rel, reason)
            else:
                found.append(entry.path)
        skips.log(f"image folder {root}")
        if not found:
            raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)} or image content) under {root!r}")
        super().__init__(found, root=root, skips=skips)


class TarShardSource:
    """Images inside uncompressed WebDataset ``.tar`` shards, read by random access (seek + read).

    The shards' headers are scanned once at construction. Members are grouped into samples by WebDataset key (the
    member path up to the first dot of its file name); a sample's image is its member whose extension is an image
    extension (``jpg`` first, then ``jpeg``, ``png``, ``webp`` ...); other members (``.json``, ``.cls`` ...) are
    ignored, as are samples without an image. Order: shards in the given order, samples in tar order.

    A shard that is missing, not a regular file or not a plain tar contributes nothing; a truncated shard keeps the
    samples before the cut, and the images it cut are counted (reason ``truncated``). Both are logged and counted in
    ``listing_skips``; only when no shard gives a sample is it an error.

    Args:
        shards: paths of the ``.tar`` files.
    """

    def __init__(self, shards: list[str]) -> None:
        if not shards:
            raise ValueError("TarShardSource needs at least one shard")
        self.shards = [str(s) for s in shards]
        keys: list[str] = []
        shard_ids, offsets, sizes = [], [], []
        skips, first_error = ListingSkips(), ""
        for shard_id, shard in enumerate(self.shards):
            try:
                samples = _scan_shard(shard, skips)
            except _ShardRejected as exc:
                skips.add(shard, exc.reason)
                first_error = first_error or str(exc)
                continue
            for key, offset, size in samples:
                keys.append(key)
                shard_ids.append(shard_id)
                offsets.append(offset)
                sizes.append(size)
        skips.log(f"{len(self.shards)} shard(s)")
        if not keys and first_error:
            raise ValueError(first_error)
        self.keys = keys
        self.listing_skips: dict[str, int] = dict(skips.counts)
        # Compact arrays: millions of samples cost 20 bytes each, not a Python tuple each.
        self.shard_ids = np.asarray(shard_ids, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self._files: dict[int, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images in {len(self.shards)} shards)"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"] = {}
        return state

    def __del__(self) -> None:
        self._close_all()

    def _close_all(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for f in getattr(self, "_files", {}).values():
                try:
                    f.close()
                except OSError:
                    pass
        self._files = {}

    def _fd(self, shard_id: int) -> int:
        if self._pid != os.getpid():  # forked worker: never share (or close) the parent's descriptors
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard_id)
        if f is None:
            if len(self._files) >= _MAX_OPEN_SHARDS:
                self._files.pop(next(iter(self._files))).close()
            f = open_regular(self.shards[shard_id])  # a shard swapped for a FIFO since the scan is refused
            self._files[shard_id] = f
        return f.fileno()

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


class _ShardRejected(ValueError):
    """A shard that gives no samples at all; ``reason`` is its short code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _scan_shard(path: str, skips: ListingSkips | None = None,
                fileobj: IO[bytes] | None = None) -> list[tuple[str, int, int]]:
    """(key, data offset, size) of each sample's image member in one uncompressed tar (read from `fileobj` when
    given, e.g. a remote shard; `path` then only names it in errors).

    Images cut by a truncation and members over ``MAX_FILE_BYTES`` go to ``skips``; a truncated shard is logged.

    Raises:
        _ShardRejected: missing, not a regular file, or not a plain tar.
    """
    skips = skips if skips is not None else ListingSkips()
    if fileobj is not None:
        size = fileobj.seek(0, os.SEEK_END)
        fileobj.seek(0)
        return _scan_tar(path, fileobj, size, skips)
    reason, st = check_regular(path)
    if reason:
        raise _ShardRejected(reason, f"shard {path!r}: {reason}")
    with open_regular(path) as f:
        return _scan_tar(path, f, st.st_size, skips)


def _scan_tar(path: str, f: IO[bytes], size: int, skips: ListingSkips) -> list[tuple[str, int, int]]:
    """The body of :func:`_scan_shard` over an open file of ``size`` bytes."""
    images: dict[str, dict[str, tuple[int, int]]] = {}
    cut, truncated = 0, False
    try:
        tar = tarfile.open(fileobj=f, mode="r:")
    except tarfile.ReadError as exc:
        raise _ShardRejected(
            "not_a_tar", f"{path}: not an uncompressed tar archive ({exc}); random access needs plain .tar"
        ) from None
    try:
        for member in tar:
            key, ext = _member_key(member)
            if key is None or ext not in _SHARD_IMAGE_EXTS:
                continue
            if member.offset_data + member.size > size:
                cut += 1
            elif member.size > MAX_FILE_BYTES:
                skips.add(f"{path}::{member.name}", "too_large")
            else:
                images.setdefault(key, {}).setdefault(ext, (member.offset_data, member.size))
    except tarfile.TarError:  # a header cut short or garbled: what came before it is intact
        truncated = True
    f.seek(tar.offset)
    truncated = truncated or f.read(512) != bytes(512)  # a complete tar ends with zero blocks
    if truncated or cut:
        skips.add(path, "truncated_shard")
        if cut:
            skips.add(path, "truncated", cut)
        logger.warning("shard %s is truncated at byte %d: %d image(s) cut, any members after the cut are lost; "
                       "%d sample(s) kept", path, size, cut, len(images))
    out = []
    for key, by_ext in images.items():  # dicts keep tar order
        ext = min(by_ext, key=_SHARD_IMAGE_EXTS.index)
        out.append((key, *by_ext[ext]))
    return out


def _member_key(member: tarfile.TarInfo) -> tuple[str | None, str]:
    """(WebDataset key, lower-case last extension) of a regular member; (None, '') for anything else."""
    if not member.isfile():
        return None, ""
    directory, _, name = member.name.rpartition("/")
    stem, dot, ext = name.partition(".")
    if not dot or not stem:
        return None, ""
    return (f"{directory}/{stem}" if directory else stem), ext.rpartition(".")[2].lower()


def _file_list(path: str) -> list[str]:
    """Entries of a ``.txt`` list as paths (names that are not UTF-8 kept as the OS spells them)."""
    base = os.path.dirname(os.path.abspath(path))
    entries = []
    for raw in read_regular(path).splitlines():
        line = os.fsdecode(raw.strip())
        if line and not line.startswith("#"):
            entries.append(line if os.path.isabs(line) else os.path.join(base, line))
    return entries


def _image_files(paths: list[str], root: str | None, what: str) -> ImageFileSource:
    """The regular files among ``paths`` (others counted and logged); ValueError when none is left."""
    kept, skips = [], ListingSkips()
    for p in paths:
        reason = check_regular(p)[0] or ("" if _is_image_name(p) else content_reason(p))
        if reason:
            skips.add(p, reason)
        else:
            kept.append(p)
    skips.log(what)
    if not kept:
        counts = ", ".join(f"{n} {r}" for r, n in sorted(skips.counts.items()))
        raise ValueError(f"{what}: no readable image files ({counts}), e.g. {skips.examples[0][0]!r}")
    return ImageFileSource(kept, root=root, skips=skips)


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
        return _image_files(entries, os.path.dirname(os.path.abspath(spec)), f"file list {spec}")
    if ".tar" in spec or any(ch in spec for ch in "{*?["):
        paths: list[str] = []
        for pattern in braceexpand(spec):  # shell-style {000..009} ranges and {a,b} lists, as webdataset
            # Non-regular matches stay in, to be refused with a reason; braces name files that may be missing.
            matches = sorted(glob.glob(pattern)) if any(ch in pattern for ch in "*?[") else [pattern]
            paths.extend(p for p in matches if not os.path.isdir(p))
        if not any(os.path.lexists(p) for p in paths):
            raise ValueError(f"no files match {spec!r}")
        if not all(p.endswith(".tar") for p in paths):
            others = [p for p in paths if not p.endswith(".tar")]
            if all(_is_image_name(p) for p in others) and len(others) == len(paths):
                return _image_files(paths, None, spec)
            raise ValueError(f"{spec!r} matches files that are neither .tar shards nor images, e.g. {others[0]!r}")
        return TarShardSource(paths)
    raise ValueError(f"dataset {spec!r}: expected an existing directory, .tar shards (glob/braces) or a .txt list")

"""One-line descriptions of the errors a user can cause: disk errors (full, quota, read-only...) name the file."""

from __future__ import annotations

import errno
from pathlib import Path

_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file size limit exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a path component is a file, not a directory",
    errno.EEXIST: "exists and is not a directory",
    errno.EISDIR: "is a directory",
}


def describe_os_error(error: OSError, path: str | Path | None = None) -> str:
    """"cannot write F: no space left on the device" and the like, one line."""
    where = error.filename or path or "?"
    reason = _REASONS.get(error.errno or -1, error.strerror or str(error))
    return f"cannot write {where}: {reason}"


def describe_error(error: BaseException) -> str:
    """One line for a user-facing error: a disk error as :func:`describe_os_error`, anything else its first line."""
    if isinstance(error, OSError) and error.errno is not None and not isinstance(error, FileNotFoundError):
        return describe_os_error(error)
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else type(error).__name__

"""Reading input files safely and writing private output files atomically.

Input: a door box reads whatever lands in its enrolment folder. A FIFO blocks ``open()``
until a writer appears, a device such as ``/dev/zero`` never ends, and a sparse file can
claim gigabytes. So a file is opened without blocking, checked with ``fstat`` on the
open descriptor (no race between the check and the read), refused unless it is a
regular file within the caller's size limit, and read no further than that limit.

Output: embeddings and faces are biometric data. A private file is written under a
temporary name in the destination folder (created 0600 by ``mkstemp``), flushed to disk,
then renamed over the destination: readers see the old file or the complete new one,
never a partial one, and an existing 0644 file is replaced by a 0600 one.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

# Errors of a write that ran out of room or hit a broken medium: reported naming the
# destination (the OS message alone does not say which file).
_WRITE_ERRNOS = frozenset(
    code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG, errno.EIO, errno.EROFS) if code
)

# What a non-regular path is, for the error message.
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "of an unknown kind")


def describe_size(size: int) -> str:
    """A byte count as people read it: ``3.0 GB``, ``512 kB``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


@contextmanager
def open_regular(path: str | os.PathLike, what: str, limit: int, error: type[Exception]) -> Iterator[BinaryIO]:
    """``path`` opened for binary reading, if it is a regular file of at most ``limit``
    bytes; otherwise ``error`` naming ``what`` (e.g. "image") and the path, in one line.

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer; the
    descriptor is then checked with fstat, so what is read is what was checked."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{what} path is {_kind(info.st_mode)}, not a regular file: {path}")
        if info.st_size > limit:
            raise error(
                f"{what} file too large ({describe_size(info.st_size)}, limit {describe_size(limit)}): {path}"
            )
        # Regular files never block; clear the flag so reads behave as usual.
        os.set_blocking(fd, True)
        file = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with file:
        yield file


def read_regular(path: str | os.PathLike, what: str, limit: int, error: type[Exception]) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (see :func:`open_regular`).
    At most ``limit`` bytes are read even if the file grows meanwhile."""
    with open_regular(path, what, limit, error) as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise error(f"{what} file too large (over {describe_size(limit)}): {path}")
    return data


@contextmanager
def private_file(path: str | os.PathLike, error: type[Exception]) -> Iterator[BinaryIO]:
    """A file that appears at ``path`` with mode 0600 when the block succeeds, complete
    and on disk, and not at all otherwise (a full disk leaves no partial file). Opened up
    front, so an unwritable destination fails before any work is done. Failures to
    write raise ``error`` naming ``path``."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise error(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno not in _WRITE_ERRNOS:
            raise
        raise error(f"cannot write {path}: {exc.strerror}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

"""Safe file access: atomic writes (a temporary file beside the target, then a rename, so a reader or a
resumed batch never sees a half-written file) and reads that refuse special files (FIFOs, devices,
sockets) without blocking on them."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

NAME_MAX = 255
"""Longest file name (in bytes) on the usual Linux, macOS and Windows file systems."""


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_read_umask()  # what open() would give a new file; mkstemp alone gives 0o600


def not_regular(kind: str) -> str:
    """The problem of a path that is ``kind`` (as :func:`file_kind` names it) rather than a regular file."""
    return f"is {kind}, not a regular file"


#: :func:`path_problem`'s answer for a folder.
IS_FOLDER = not_regular("a folder")


class NotRegularFileError(OSError):
    """A path that names a FIFO, device, socket or folder where a regular file was expected."""

    def __init__(self, path: str | os.PathLike[str], kind: str) -> None:
        self.kind = kind
        super().__init__(errno.EINVAL, not_regular(kind), os.fspath(path))

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


#: What to do about an annexed file whose content was not fetched (datalad and git-annex datasets).
ANNEX_HINT = "its content is not here: fetch it with `datalad get` or `git annex get`"


def says_what_to_do(problem: str) -> bool:
    """Whether a :func:`path_problem` answer already carries its remedy (an unfetched annexed file), so
    callers add their generic advice only to the others."""
    return ANNEX_HINT in problem


def file_kind(mode: int) -> str | None:
    """What a non-regular file is (``a FIFO (named pipe)``, ...), or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"


def path_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be read as a regular file (missing, dangling or looping link, special file),
    judged from its metadata alone (nothing is opened); None when it is a regular file."""
    try:
        info = os.stat(path)
    except OSError as exc:
        if os.path.islink(path):
            target = os.readlink(path)
            if exc.errno == errno.ELOOP:
                return f"symbolic link that loops (-> {target})"
            if "annex/objects" in target.replace(os.sep, "/"):
                return f"dangling symbolic link into a git-annex store (-> {target}); {ANNEX_HINT}"
            return f"dangling symbolic link (-> {target}, which does not exist)"
        if exc.errno == errno.ELOOP:
            return "a symbolic link on the path loops"
        if exc.errno == errno.ENAMETOOLONG:
            return "path or file name too long"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return "permission denied"
        if exc.errno == errno.ENOENT:
            return "file not found"
        return exc.strerror or str(exc)
    kind = file_kind(info.st_mode)
    return None if kind is None else not_regular(kind)


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a regular file for binary reading; a FIFO, device or socket is refused without blocking
    (checked before opening and again on the open descriptor)."""
    kind = file_kind(os.stat(path).st_mode)
    if kind is not None:
        raise NotRegularFileError(path, kind)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        kind = file_kind(os.fstat(fd).st_mode)
        if kind is not None:
            raise NotRegularFileError(path, kind)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _clip_utf8(text: str, limit: int, from_end: bool = False) -> str:
    """The longest head (or tail) of ``text`` whose UTF-8 encoding has at most ``limit`` bytes."""
    raw = text.encode("utf-8", "surrogateescape")
    if len(raw) <= limit:
        return text
    part = raw[-limit:] if from_end else raw[:limit]
    return part.decode("utf-8", "ignore")


def temporary_prefix(name: str) -> str:
    """A hidden temporary-name prefix for ``name`` that stays short enough for any file system:
    long names keep their head and their tail (``.head~tail.``), so the kind suffix stays visible."""
    if len(name.encode("utf-8", "surrogateescape")) <= 120:
        return f".{name}."
    return f".{_clip_utf8(name, 60)}~{_clip_utf8(name, 40, from_end=True)}."


@contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it gets the usual permissions
    and replaces ``path``, otherwise it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path.name), suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)

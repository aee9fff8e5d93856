"""gzip through ISA-L (the ``isal`` package: the same file format, 3-8x faster than zlib) with the
standard library as the fallback: (de)compressing ``.nii.gz`` files is a large share of scoring a brain
and most of opening a scan in the viewer."""

from __future__ import annotations

import gzip
import zlib
from types import ModuleType
from typing import BinaryIO, cast

_isal_gzip: ModuleType | None
_corrupt: list[type[BaseException]] = [zlib.error, gzip.BadGzipFile]
try:
    from isal import igzip as _isal_gzip
    from isal import igzip_lib

    _corrupt.append(cast("type[BaseException]", igzip_lib.IsalError))
except ImportError:  # pragma: no cover - a dependency; only a broken install lacks it
    _isal_gzip = None

ACCELERATED = _isal_gzip is not None
"""Whether ISA-L does the work (False: the standard library's zlib)."""

WRITE_LEVEL = 1
"""Compression level of written files: the fastest level; higher ones shrink brain maps by a few percent."""

CORRUPT_ERRORS: tuple[type[BaseException], ...] = tuple(_corrupt)
"""What a damaged deflate stream raises, whichever library reads it (a truncated one raises EOFError)."""


def reader(fileobj: BinaryIO) -> BinaryIO:
    """A decompressing stream over an open binary file (``readinto``, ``seek`` forward, ``read``)."""
    if _isal_gzip is not None:
        return cast(BinaryIO, _isal_gzip.IGzipFile(fileobj=fileobj, mode="rb"))
    return cast(BinaryIO, gzip.GzipFile(fileobj=fileobj, mode="rb"))


def read_all(path: str) -> bytes:
    """The whole decompressed content of a gzip file (read, then inflated in one call: faster than a
    stream, and the GIL is released meanwhile)."""
    with open(path, "rb") as handle:
        packed = handle.read()
    if _isal_gzip is not None:
        return cast(bytes, _isal_gzip.decompress(packed))
    return gzip.decompress(packed)


def compress(data: bytes) -> bytes:
    """``data`` as one gzip member at :data:`WRITE_LEVEL` (a timestamp of 0: equal inputs, equal files)."""
    if _isal_gzip is not None:
        return _isal_gzip.compress(data, compresslevel=WRITE_LEVEL, mtime=0)
    return gzip.compress(data, compresslevel=WRITE_LEVEL, mtime=0)

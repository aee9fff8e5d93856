"""Cached NIfTI loading for the viewer: each checked path is read once per (path, mtime, size) and kept
as a read-only canonical (RAS) volume with its display statistics, so switching scans, planes and
slices costs no disk access."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
import streamlit as st
from nibabel.spatialimages import SpatialImage
from streamlit.runtime.scriptrunner import add_script_run_ctx, get_script_run_ctx

from anomaly import gzipio
from anomaly.viz import CanonicalVolume, auto_window, to_canonical

SAMPLE_VOXELS = 400_000
"""Voxels (an even stride through the volume) behind the percentiles of the display statistics."""

MAX_CACHED_VOLUMES = 24
"""Volumes kept in memory (about eight scans with input, map and reconstruction)."""


class VolumeLoadError(RuntimeError):
    """A recorded file that exists but cannot be read as a 3D volume."""


@dataclass(frozen=True)
class LoadedVolume:
    """A canonical volume with what the viewer needs to draw it: auto window and value range."""

    volume: CanonicalVolume
    window: tuple[float, float]
    vmin: float
    vmax: float
    p99: float
    """99th percentile of the non-zero values (a default overlay threshold when no calibration exists)."""


def _fast_nifti(path: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Voxels (float32) and affine of a ``.nii.gz`` file decompressed in one go by ISA-L and parsed from
    memory, native float32 voxels used in place without a copy; None where that does not apply (another
    format, no ISA-L, a damaged file), so that nibabel reads it and words any error."""
    if not gzipio.ACCELERATED or not path.lower().endswith(".nii.gz"):
        return None
    try:
        raw = gzipio.read_all(path)
        klass = nib.Nifti2Image if nib.Nifti2Header.may_contain_header(raw[:540]) else nib.Nifti1Image
        image = klass.from_bytes(raw)
        proxy: Any = image.dataobj  # the header as read: voxel offset, type, scaling and shape
        shape = tuple(int(n) for n in proxy.shape)
        if (proxy.dtype == np.dtype(np.float32) and float(proxy.slope) == 1.0 and float(proxy.inter) == 0.0
                and proxy.order == "F" and proxy.offset + 4 * math.prod(shape) <= len(raw)):
            data = np.frombuffer(raw, np.float32, math.prod(shape), proxy.offset).reshape(shape, order="F")
        else:
            data = np.asarray(image.get_fdata(dtype=np.float32))
        return data, np.asarray(image.affine)
    except Exception:  # noqa: BLE001 - nibabel reads it again and reports what is wrong
        return None


def _read(path: str) -> tuple[np.ndarray, np.ndarray]:
    fast = _fast_nifti(path)
    if fast is not None:
        return fast
    image = cast(SpatialImage, nib.load(path))
    return np.asarray(image.get_fdata(dtype=np.float32)), np.asarray(image.affine)


def read_canonical(path: str | Path) -> LoadedVolume:
    """Read a NIfTI file (no cache) into a read-only RAS volume with statistics."""
    try:
        data, affine = _read(str(path))
    except Exception as exc:  # noqa: BLE001 - any reading failure is reported with the file
        raise VolumeLoadError(f"{path}: cannot be read as NIfTI ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeLoadError(f"{path}: expected a 3D volume, found shape {data.shape}")
    volume = to_canonical(data, affine)
    sample = data.ravel(order="K")  # memory order: a view, where a C-order reshape would copy a NIfTI array
    if sample.size > SAMPLE_VOXELS:
        sample = sample[:: int(np.ceil(sample.size / SAMPLE_VOXELS))]
    low, high = (float(data.min()), float(data.max())) if data.size else (0.0, 1.0)
    if np.isfinite(low) and np.isfinite(high):  # NaN would make both NaN, infinities one of them
        vmin, vmax = low, high
    else:
        finite = sample[np.isfinite(sample)]
        vmin, vmax = (float(np.nanmin(data)), float(np.nanmax(data))) if finite.size else (0.0, 1.0)
    nonzero = sample[np.isfinite(sample) & (sample != 0)]
    p99 = float(np.percentile(nonzero, 99)) if nonzero.size else vmax
    return LoadedVolume(volume, auto_window(sample), vmin, vmax, p99)


@st.cache_resource(max_entries=MAX_CACHED_VOLUMES, show_spinner=False)
def _cached(path: str, mtime_ns: int, size: int) -> LoadedVolume:
    return read_canonical(path)


def load(path: Path) -> LoadedVolume:
    """The cached volume at an already checked path; a changed file (mtime or size) is read again."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise VolumeLoadError(
            f"{path}: file not found ({exc.strerror}); was the output folder moved or cleaned?"
        ) from exc
    return _cached(str(path), stat.st_mtime_ns, stat.st_size)


def load_many(paths: Sequence[Path]) -> list[LoadedVolume | VolumeLoadError]:
    """:func:`load` for several files at once, read in parallel threads (decompression runs outside
    the GIL); each item is the volume or the error that file gave."""
    ctx = get_script_run_ctx()

    def one(path: Path) -> LoadedVolume | VolumeLoadError:
        if ctx is not None:
            add_script_run_ctx(threading.current_thread(), ctx)
        try:
            return load(path)
        except VolumeLoadError as exc:
            return exc

    if len(paths) <= 1:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(4, len(paths)), thread_name_prefix="nifti") as pool:
        return list(pool.map(one, paths))


_prefetching = threading.Lock()


def prefetch(paths: Sequence[Path]) -> bool:
    """Read files into the cache in a background thread (e.g. the next scan while the current one is
    reviewed); skipped when a prefetch is already running. Errors are ignored here: they show when
    the scan is opened."""
    if not paths or not _prefetching.acquire(blocking=False):
        return False
    ctx = get_script_run_ctx()

    def work() -> None:
        try:
            if ctx is not None:
                add_script_run_ctx(threading.current_thread(), ctx)
            for path in paths:
                try:
                    load(path)
                except Exception:  # noqa: BLE001 - reported when the scan is opened
                    continue
        finally:
            _prefetching.release()

    threading.Thread(target=work, name="nifti-prefetch", daemon=True).start()
    return True

"""The in-plane median filter of a map, computed only where its value matters.

A map is read inside the scored (eroded) brain only, and a signed rule leaves about half of those voxels
at zero. For a map without negative values, a window whose zeros fill at least half of it has median
zero, so the median is sorted out only where enough positive neighbours meet: the same values as
``scipy.ndimage.median_filter`` on those voxels (its ``reflect`` border included), in a third of its time.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

#: Voxels whose windows are sorted out at a time (bounds the memory of the gathered windows).
CHUNK = 200_000


def median_in_plane(values: np.ndarray, size: int, where: np.ndarray | None = None) -> np.ndarray:
    """Median over ``size x size`` in-plane windows (axes 0 and 1) of a 3D array; with ``where``, exact on
    those voxels only (the caller reads no other voxel; they may hold zero)."""
    if where is None or values.size == 0 or float(values.min()) < 0:
        return ndimage.median_filter(values, size=(size, size, 1))
    n = size * size
    positives = ndimage.uniform_filter((values > 0).astype(np.float32), size=(size, size, 1), mode="reflect") * n
    need = where & (positives > n - n // 2 - 0.5)  # fewer positives than that: the window's median is zero
    out = np.zeros_like(values)
    # scipy's "reflect" border repeats the edge voxel, as numpy's "symmetric" padding does
    before, after = size // 2, size - 1 - size // 2
    padded = np.pad(values, ((before, after), (before, after), (0, 0)), mode="symmetric")
    windows = sliding_window_view(padded, (size, size), axis=(0, 1))
    index = np.nonzero(need)
    for start in range(0, len(index[0]), CHUNK):
        part = tuple(i[start:start + CHUNK] for i in index)
        gathered = windows[part].reshape(-1, n)
        out[part] = np.partition(gathered, n // 2, axis=1)[:, n // 2]
    return out

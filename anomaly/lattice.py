"""Exact shortcuts for grids that share one voxel lattice.

The model grid is usually the input's own lattice reoriented, cropped and padded (a 1 mm scan scored on
a 1 mm grid): every output voxel then sits exactly on an input voxel, and resampling is a transpose, a
flip and a copy. :func:`lattice_map` recognises that case from the two affines; :func:`copy_on_lattice`
does the copy, with the values an interpolating resampler would give at those exact points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Largest deviation (in voxels) from an exact signed permutation and integer shift still taken as one lattice.
TOLERANCE = 1e-4


@dataclass(frozen=True)
class LatticeMap:
    """Destination voxel ``i`` along axis ``d`` reads source voxel ``sign[d] * i + offset[d]`` along
    source axis ``axes[d]``."""

    axes: tuple[int, int, int]
    sign: tuple[int, int, int]
    offset: tuple[int, int, int]


def lattice_map(src_affine: np.ndarray, dst_affine: np.ndarray, tolerance: float = TOLERANCE) -> LatticeMap | None:
    """How destination voxels land on source voxels, when each lands exactly on one; else None."""
    vox = np.linalg.inv(np.asarray(src_affine, dtype=np.float64)) @ np.asarray(dst_affine, dtype=np.float64)
    rot, shift = vox[:3, :3], vox[:3, 3]
    rounded = np.round(rot)
    if not np.allclose(rot, rounded, atol=tolerance, rtol=0) or not np.allclose(shift, np.round(shift),
                                                                               atol=tolerance, rtol=0):
        return None
    if not (np.abs(rounded).sum(axis=0) == 1).all() or not (np.abs(rounded).sum(axis=1) == 1).all():
        return None
    axes = tuple(int(np.flatnonzero(rounded[:, d])[0]) for d in range(3))
    sign = tuple(int(rounded[axes[d], d]) for d in range(3))
    offset = tuple(int(np.round(shift[axes[d]])) for d in range(3))
    return LatticeMap(axes, sign, offset)  # type: ignore[arg-type]


def copy_on_lattice(source: np.ndarray, mapping: LatticeMap, shape: tuple[int, ...]) -> np.ndarray:
    """``source`` read at the destination's voxels (zero where they fall outside it)."""
    moved = np.transpose(source, mapping.axes)
    out = np.zeros(tuple(shape), dtype=source.dtype)
    dst_index, src_index = [], []
    for d in range(3):
        n_src, n_dst = moved.shape[d], int(shape[d])
        s, o = mapping.sign[d], mapping.offset[d]
        # destination voxels i with 0 <= s * i + o < n_src
        lo, hi = (max(0, -o), min(n_dst, n_src - o)) if s > 0 else (max(0, o - n_src + 1), min(n_dst, o + 1))
        if hi <= lo:
            return out
        dst_index.append(slice(lo, hi))
        if s > 0:
            src_index.append(slice(lo + o, hi + o))
        else:
            stop = o - hi
            src_index.append(slice(o - lo, stop if stop >= 0 else None, -1))
    out[tuple(dst_index)] = moved[tuple(src_index)]
    return out

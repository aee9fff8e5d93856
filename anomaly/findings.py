"""Findings: connected components of a thresholded anomaly map, measured in world units (mL, mm) and,
for scans in MNI space, named by atlas region.

Components use 26-connectivity. Findings are ranked by peak score (highest first; ties by larger
volume, then by position in the volume), because the peak is what a reviewer checks first and a
large faint region should not hide a small intense one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from anomaly.atlas import Atlas
from anomaly.records import DEFAULT_MIN_VOLUME_ML

NOT_MNI_NOTE = "region unavailable: scan not in MNI space"
NO_ATLAS_NOTE = "region unavailable: no atlas loaded"
MAX_REGION_POINTS = 50000
"""Voxels of one finding looked up in the atlas for its majority region (a regular subsample above)."""


@dataclass(frozen=True)
class Finding:
    """One connected anomalous region of a scan."""

    rank: int
    n_voxels: int
    volume_ml: float
    centroid: tuple[float, float, float]
    """Mean world position of the voxels (mm)."""
    peak: float
    peak_position: tuple[float, float, float]
    """World position of the highest-scoring voxel (mm; the first in C order on ties)."""
    mean: float
    region_centroid: str | None = None
    region_majority: str | None = None
    atlas: str | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Flat dictionary with the keys of a findings row."""
        return {
            "rank": self.rank,
            "n_voxels": self.n_voxels,
            "volume_ml": self.volume_ml,
            "centroid_x": self.centroid[0],
            "centroid_y": self.centroid[1],
            "centroid_z": self.centroid[2],
            "peak_x": self.peak_position[0],
            "peak_y": self.peak_position[1],
            "peak_z": self.peak_position[2],
            "peak": self.peak,
            "mean": self.mean,
            "region_centroid": self.region_centroid,
            "region_majority": self.region_majority,
            "atlas": self.atlas,
        }


def components(mask: np.ndarray, voxel_ml: float, min_volume_ml: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(labels, counts, kept)``: the 26-connected components of ``mask``, their voxel counts (index 0 is
    the background) and the labels of those whose volume reaches ``min_volume_ml`` (a relative tolerance
    absorbs float rounding). The one rule for which components count as findings."""
    labels, n = ndimage.label(np.asarray(mask, dtype=bool), structure=np.ones((3, 3, 3), dtype=bool))
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    kept = np.flatnonzero(counts[1:] * voxel_ml >= min_volume_ml * (1 - 1e-9)) + 1
    return labels, counts, kept


def drop_small_components(mask: np.ndarray, voxel_ml: float, min_volume_ml: float) -> np.ndarray:
    """``mask`` without the components smaller than ``min_volume_ml`` (those :func:`extract_findings` skips)."""
    mask = np.asarray(mask, dtype=bool)
    if min_volume_ml <= 0 or not mask.any():
        return mask
    labels, counts, kept = components(mask, voxel_ml, min_volume_ml)
    keep = np.zeros(counts.size, dtype=bool)
    keep[kept] = True
    return keep[labels]


def _world(affine: np.ndarray, ijk: np.ndarray) -> tuple[float, float, float]:
    x, y, z = nib.affines.apply_affine(affine, np.asarray(ijk, dtype=np.float64))
    return float(x), float(y), float(z)


def extract_findings(
    score_map: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    *,
    min_volume_ml: float = DEFAULT_MIN_VOLUME_ML,
    atlas: Atlas | None = None,
    in_mni: bool = False,
    max_findings: int | None = None,
    to_atlas: Callable[[np.ndarray], np.ndarray] | None = None,
) -> list[Finding]:
    """Connected components of ``mask`` with volume >= ``min_volume_ml``, measured on ``score_map``.

    ``volume_ml = n_voxels * |det(affine[:3, :3])| / 1000``. Regions are looked up only when an
    ``atlas`` is given and ``in_mni`` is true (see :func:`anomaly.atlas.is_mni_space`); otherwise they
    are ``None`` and ``note`` says why. ``max_findings`` keeps the best-ranked ones. ``to_atlas`` maps
    world points of the scan (N x 3 mm) into the atlas's space (a registration to MNI152); reported
    coordinates stay the scan's own.
    """
    scores = np.asarray(score_map)
    binary = np.asarray(mask, dtype=bool)
    affine = np.asarray(affine, dtype=np.float64)
    if scores.ndim != 3 or binary.shape != scores.shape:
        raise ValueError(f"extract_findings: need a 3D map and a mask of the same shape, got {scores.shape} "
                         f"and {binary.shape}")
    if affine.shape != (4, 4):
        raise ValueError(f"extract_findings: the affine must be 4x4, got {affine.shape}")
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    if voxel_ml <= 0:
        raise ValueError("extract_findings: the affine is singular (zero voxel volume); check the scan header")
    if not binary.any():
        return []
    if not np.isfinite(scores[binary]).all():
        raise ValueError("extract_findings: the score map holds NaN or infinite values inside the mask; "
                         "clean the map before extracting findings")

    labels, counts, keep = components(binary, voxel_ml, min_volume_ml)
    if keep.size == 0:
        return []
    peaks = np.atleast_1d(np.asarray(ndimage.maximum(scores, labels, keep), dtype=np.float64))
    peak_positions = ndimage.maximum_position(scores, labels, keep)
    means = np.atleast_1d(np.asarray(ndimage.mean(scores, labels, keep), dtype=np.float64))
    centroids_ijk = ndimage.center_of_mass(binary, labels, keep)

    order = sorted(range(keep.size), key=lambda i: (-peaks[i], -counts[keep[i]], int(keep[i])))
    if max_findings is not None:
        order = order[:max(0, int(max_findings))]

    use_atlas = atlas is not None and in_mni
    note = None if use_atlas else (NOT_MNI_NOTE if not in_mni else NO_ATLAS_NOTE)
    objects = ndimage.find_objects(labels) if use_atlas else None
    findings = []
    for rank, i in enumerate(order, start=1):
        label = int(keep[i])
        n_vox = int(counts[label])
        centroid = _world(affine, centroids_ijk[i])
        region_centroid = region_majority = None
        if atlas is not None and objects is not None:
            lookup = to_atlas if to_atlas is not None else (lambda pts: pts)
            region_centroid = atlas.label_at(lookup(np.asarray([centroid]))[0])
            box = objects[label - 1]
            voxels = np.argwhere(labels[box] == label) + np.array([s.start for s in box])
            if voxels.shape[0] > MAX_REGION_POINTS:
                voxels = voxels[:: -(-voxels.shape[0] // MAX_REGION_POINTS)]
            region_majority = atlas.majority_label(lookup(nib.affines.apply_affine(affine, voxels)))
        findings.append(Finding(
            rank=rank,
            n_voxels=n_vox,
            volume_ml=n_vox * voxel_ml,
            centroid=centroid,
            peak=float(peaks[i]),
            peak_position=_world(affine, peak_positions[i]),
            mean=float(means[i]),
            region_centroid=region_centroid,
            region_majority=region_majority,
            atlas=atlas.name if use_atlas and atlas is not None else None,
            note=note,
        ))
    return findings

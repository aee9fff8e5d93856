"""A scored, calibrated run written straight into a store: small synthetic anomaly maps with their brain
masks and lesion labels on disk, recorded in bulk (no model), for evaluation and calibration at many scans.

Every scan has a ball-shaped brain of gamma-noise scores; every other one a brighter lesion ball whose
label is one voxel larger than the bright region (imperfect overlap). Scan ``i`` is the same at any ``n``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from tests.conftest import write_nifti

SIZE = 20
"""Edge of the cubic maps (voxels)."""


@dataclass(frozen=True)
class SyntheticScan:
    """One scan's arrays: anomaly map, brain mask and lesion label (all on the same grid)."""

    amap: np.ndarray
    brain: np.ndarray
    label: np.ndarray


def _ball(centre: np.ndarray, radius: float, size: int) -> np.ndarray:
    grid = np.indices((size,) * 3)
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2


def synthetic_scan(i: int, size: int = SIZE) -> SyntheticScan:
    """Scan ``i``: gamma noise in the brain, and for odd ``i`` a lesion of raised scores."""
    rng = np.random.default_rng(1000 + i)
    brain = _ball(np.full(3, (size - 1) / 2), size * 0.45, size)
    amap = np.where(brain, rng.gamma(2.0, 0.1, (size,) * 3), 0.0).astype(np.float32)
    label = np.zeros(brain.shape, dtype=bool)
    if i % 2:
        centre = np.full(3, size / 2) + rng.integers(-3, 4, 3)
        lesion = _ball(centre, 2.5, size) & brain
        amap[lesion] += rng.uniform(0.2, 0.6, int(lesion.sum())).astype(np.float32)
        label = ndimage.binary_dilation(lesion) & brain
    return SyntheticScan(amap, brain, label)


def synthetic_scans(n: int, size: int = SIZE) -> Iterator[SyntheticScan]:
    """Scans ``0 .. n - 1``, made one at a time."""
    return (synthetic_scan(i, size) for i in range(n))


def scored_run(root: Path, n: int, *, voxel_threshold: float = 0.6, size: int = SIZE) -> tuple[str, int, Path]:
    """Write ``n`` synthetic scans' maps, brain masks and labels under ``root`` and record them as one
    calibrated run in ``root/r.db``; returns the store URL, the run id and the labels folder."""
    import anomaly.store as st
    from anomaly.store import bulk

    out, labels = root / "out", root / "labels"
    rows = []
    for i, scan in enumerate(synthetic_scans(n, size)):
        name = f"scan{i:05d}"
        map_path = str(write_nifti(out / f"{name}_anomaly.nii.gz", scan.amap))
        write_nifti(out / f"{name}_brain.nii.gz", scan.brain.astype(np.uint8), dtype=np.uint8)
        if scan.label.any():
            write_nifti(labels / f"{name}.nii.gz", scan.label.astype(np.uint8), dtype=np.uint8)
        rows.append((name, map_path, float(np.percentile(scan.amap[scan.brain], 99))))
    labels.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{root / 'r.db'}"
    store = st.open_store(url)
    now = st.utcnow()
    with store.session() as s:
        model = st.get_or_create_model(s, "synthetic", "0" * 64)
        calibration = st.save_calibration(s, "synthetic", model, "healthy-fpr", voxel_threshold)
        run_id = st.open_run(s, model, {}, "1" * 64, out, calibration).id
        hashes = [hashlib.sha256(name.encode()).hexdigest() for name, _, _ in rows]
        ids = bulk.add_scans(s, [{"content_hash": h, "path": str(root / "inputs" / f"{name}.nii.gz"), "name": name,
                                  "created_at": now} for h, (name, _, _) in zip(hashes, rows, strict=True)])
        bulk.add_results(s, run_id, [
            {"scan_id": ids[h], "input_path": str(root / "inputs" / f"{name}.nii.gz"), "status": "ok",
             "score": score, "map_path": map_path, "created_at": now, "updated_at": now}
            for h, (name, map_path, score) in zip(hashes, rows, strict=True)])
        st.refresh_run(s, run_id)
        st.finish_run(s, run_id)
    store.close()
    return url, run_id, labels

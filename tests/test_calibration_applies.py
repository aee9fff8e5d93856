"""One calibration, one rule: the findings mask `anomaly score` writes is, voxel for voxel, the mask
`anomaly evaluate` measures, also for voxels that lie exactly on the threshold or within float32
rounding of it (a float32 voxel of v against a threshold a quarter of a float32 step above v is out)."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anomaly.calibration import Calibration
from anomaly.records import CalibrationData
from anomaly.store import get_calibration, get_run, open_store, save_calibration
from pipelines.cli import main
from tests.conftest import phantom, write_nifti

SHAPE = (40, 48, 36)
AFFINE = np.diag([1.2, 1.0, 1.3, 1.0])
COMMON = ["--model", "intensity", "--quiet", "--no-recon"]


def _read(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Two phantoms (one with a labelled lesion) scored once without a calibration."""
    root = tmp_path_factory.mktemp("applies")
    write_nifti(root / "scans" / "calm.nii.gz", phantom(SHAPE, seed=3), AFFINE)
    sick = phantom(SHAPE, seed=4, lesion=True)
    write_nifti(root / "scans" / "sick.nii.gz", sick, AFFINE)
    label = (sick > np.percentile(sick[sick > 0], 97)).astype(np.uint8)
    write_nifti(root / "labels" / "sick.nii.gz", label, AFFINE, dtype=np.uint8)
    db = root / "r.db"
    assert main(["score", str(root / "scans"), "--out", str(root / "plain"), "--db", str(db), *COMMON]) == 0
    amap = _read(root / "plain" / "sick_anomaly.nii.gz")
    brain = _read(root / "plain" / "sick_brain.nii.gz") > 0
    assert amap.dtype == np.float32
    inside = np.sort(amap[brain & (amap > 0)])
    value = inside[int(inside.size * 0.97)]  # a voxel value of the map's upper tail
    return {"root": root, "db": db, "value": value}


def _calibrate_at(db: Path, name: str, threshold: float) -> str:
    store = open_store(str(db))
    try:
        with store.session() as s:
            run = get_run(s, 1)
            row = save_calibration(s, name, run.model_id, "manual", threshold, settings_hash=run.settings_hash,
                                   data=CalibrationData(source="test", settings=dict(run.settings)).to_dict())
            return row.ref
    finally:
        store.close()


@pytest.mark.parametrize("offset", [0.0, 0.25], ids=["on-the-threshold", "a-quarter-float32-step-below"])
def test_score_writes_the_mask_evaluate_measures(scored: dict[str, object], offset: float) -> None:
    root, db, value = Path(str(scored["root"])), Path(str(scored["db"])), np.float32(scored["value"])
    step = float(np.spacing(value))
    threshold = float(value) + offset * step
    assert np.float32(threshold) == value  # the threshold rounds to the voxel value in float32
    ref = _calibrate_at(db, f"edge{int(offset * 100)}", threshold)
    out, ev = root / f"out{int(offset * 100)}", root / f"eval{int(offset * 100)}"
    assert main(["score", str(root / "scans"), "--out", str(out), "--db", str(db), "--calibration", ref,
                 *COMMON]) == 0
    assert main(["evaluate", "--db", str(db), "--run", "latest", "--labels", str(root / "labels"), "--out",
                 str(ev), "--healthy-without-labels", "--quiet"]) == 0
    with open(ev / "per_scan.csv", newline="") as handle:
        rows = {r["name"]: r for r in csv.DictReader(handle)}
    store = open_store(str(db))
    try:
        with store.session() as s:
            stored = get_calibration(s, ref)
            assert stored is not None
            calibration = Calibration.from_stored(stored)
    finally:
        store.close()

    amap = _read(out / "sick_anomaly.nii.gz")
    brain = _read(out / "sick_brain.nii.gz") > 0
    written = _read(out / "sick_mask.nii.gz") > 0
    on_edge = brain & (amap == value)
    assert on_edge.any()  # the boundary voxels exist in the scored map
    # the written mask is the rule applied exactly: edge voxels in when the threshold is their value, out above it
    assert bool(written[on_edge].all()) is (offset == 0.0) and not (written[on_edge].any() and offset > 0)
    assert np.array_equal(written, calibration.voxel_mask(amap, brain))
    if offset > 0:  # a plain float32 comparison would have put them in
        assert ((amap >= threshold) & brain).sum() == written.sum() + on_edge.sum()
    truth = (_read(root / "labels" / "sick.nii.gz") > 0) & brain
    row = rows["sick"]
    assert int(row["n_pred_voxels"]) == int(written.sum())
    tp = int((written & truth).sum())
    assert float(row["dice"]) == pytest.approx(2 * tp / (written.sum() + truth.sum()), rel=1e-12)
    assert int(rows["calm"]["n_pred_voxels"]) == int(_read(out / "calm_mask.nii.gz").astype(bool).sum())

"""``anomaly calibrate`` then ``anomaly score --calibration`` on phantom brains with an anisotropic grid:
thresholds, held-out false-positive rate, flags, masks and findings checked against independent counts."""

from __future__ import annotations

import csv
import hashlib
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from anomaly.store import findings_table, get_calibration, list_calibrations, open_store
from pipelines.cli import main
from tests.conftest import phantom, write_nifti

AFFINE = np.array([[1.1, 0.0, 0.0, -30.0], [0.0, 0.9, 0.0, -28.0], [0.0, 0.0, 1.3, -31.0], [0.0, 0.0, 0.0, 1.0]])
VOXEL_ML = 1.1 * 0.9 * 1.3 / 1000.0
SHAPE = (56, 64, 48)
TARGET = 0.01
SCAN_TARGET = 0.1
N_CAL, N_HELD_OUT, N_LESION = 12, 4, 3


def lesion_blob(centre: tuple[float, float, float], radius: float) -> np.ndarray:
    """A ball in the phantom's normalised [-1, 1] coordinates."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij"))
    return np.sqrt(sum(((g - c) / radius) ** 2 for g, c in zip(grid, centre, strict=True))) < 1


def read(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(path))
    return np.asarray(image.dataobj), np.asarray(image.affine)


def brain_of(map_path: str | Path) -> np.ndarray:
    return read(str(map_path).replace("_anomaly.nii", "_brain.nii"))[0] > 0


def rows_of(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {Path(r["path"]).name.split(".")[0]: r for r in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Calibrate on 12 healthy phantoms, then score 4 held-out healthy ones and 3 with lesions."""
    root = tmp_path_factory.mktemp("calflow")
    for i in range(N_CAL):
        write_nifti(root / "cal" / f"h{i:02d}.nii.gz", phantom(SHAPE, seed=i), AFFINE)
    for i in range(N_HELD_OUT):
        write_nifti(root / "test" / f"healthy{i}.nii.gz", phantom(SHAPE, seed=100 + i), AFFINE)
    for i, (centre, radius, value) in enumerate([((0.35, -0.2, 0.0), 0.12, 180.0), ((-0.3, 0.25, 0.1), 0.15, 150.0),
                                                 ((0.0, 0.4, -0.2), 0.1, 170.0)]):
        data = phantom(SHAPE, seed=200 + i)
        blob = lesion_blob(centre, radius)
        data[blob] = value
        write_nifti(root / "test" / f"lesion{i}.nii.gz", data, AFFINE)
        write_nifti(root / "labels" / f"lesion{i}.nii.gz", blob.astype(np.uint8), AFFINE, dtype=np.uint8)
    db = root / "results.db"
    assert main(["calibrate", "--db", str(db), "--model", "intensity", "--healthy", str(root / "cal"),
                 "--target-fpr", str(TARGET), "--scan-target-fpr", str(SCAN_TARGET), "--name", "phantom",
                 "--bootstrap", "200", "--quiet"]) == 0
    assert main(["score", str(root / "test"), "--out", str(root / "out"), "--model", "intensity", "--db", str(db),
                 "--calibration", "phantom", "--csv", str(root / "scores.csv"), "--quiet", "--no-recon"]) == 0
    return {"root": root, "db": db, "csv": root / "scores.csv", "out": root / "out",
            "cal_out": root / "calibration" / "phantom"}


def stored(db: Path, ref: str = "phantom") -> dict:
    store = open_store(str(db))
    try:
        with store.session() as s:
            cal = get_calibration(s, ref)
            assert cal is not None
            return {"voxel": cal.voxel_threshold, "scan": cal.scan_threshold, "target": cal.target_fpr,
                    "method": cal.method, "data": cal.data, "metrics": cal.metrics, "ref": cal.ref,
                    "settings_hash": cal.settings_hash, "model": cal.model.name}
    finally:
        store.close()


def test_thresholds_equal_an_independent_count_on_the_calibration_maps(flow: dict[str, Path]) -> None:
    cal = stored(flow["db"])
    maps = sorted(flow["cal_out"].glob("*_anomaly.nii.gz"))
    assert len(maps) == N_CAL
    pooled = np.concatenate([read(m)[0][brain_of(m)] for m in maps]).astype(np.float64)
    # the smallest value t whose exceedances #(v >= t) stay within floor(rate * N)
    allowed = math.floor(TARGET * pooled.size)
    ordered = np.sort(pooled)[::-1]
    expected = float(ordered[ordered > ordered[allowed]].min())
    assert cal["voxel"] == pytest.approx(expected, abs=0, rel=1e-7)
    exceed = np.count_nonzero(pooled >= cal["voxel"])
    assert TARGET * pooled.size - 50 < exceed <= allowed
    lo, hi = cal["metrics"]["voxel_threshold_ci"]
    assert lo <= cal["voxel"] <= hi

    scores = np.sort([float(r.score) for r in _run_results(flow["db"], cal["data"]["run_id"])])[::-1]
    allowed_scans = math.floor(SCAN_TARGET * N_CAL)  # one of twelve healthy scans may lie above
    assert cal["scan"] == pytest.approx(scores[scores > scores[allowed_scans]].min(), rel=1e-7)

    assert cal["method"] == "healthy-fpr" and cal["target"] == TARGET and cal["model"] == "intensity"
    assert cal["data"]["min_volume_ml"] == 0.05 and cal["data"]["n_scans"] == N_CAL
    recorded = {Path(s["path"]).name: s["content_hash"] for s in cal["data"]["scans"]}
    assert recorded == {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in (flow["root"] / "cal").glob("*.nii.gz")}
    assert cal["settings_hash"] and cal["metrics"]["n_voxels"] == pooled.size


def _run_results(db: Path, run_id: int) -> list:
    from anomaly.store import run_results

    store = open_store(str(db))
    try:
        with store.session() as s:
            return run_results(s, run_id, status="ok")
    finally:
        store.close()


def test_held_out_healthy_false_positive_rate_is_within_a_factor_of_two(flow: dict[str, Path]) -> None:
    threshold = stored(flow["db"])["voxel"]
    false_pos = brain_voxels = 0
    for i in range(N_HELD_OUT):
        amap, affine = read(flow["out"] / f"healthy{i}_anomaly.nii.gz")
        mask, mask_affine = read(flow["out"] / f"healthy{i}_mask.nii.gz")
        brain = brain_of(flow["out"] / f"healthy{i}_anomaly.nii.gz")
        assert mask.shape == SHAPE and np.allclose(mask_affine, AFFINE, atol=1e-5)
        np.testing.assert_array_equal(mask > 0, (amap >= np.float32(threshold)) & brain)
        false_pos += int(np.count_nonzero(mask))
        brain_voxels += int(brain.sum())
    fpr = false_pos / brain_voxels
    assert TARGET / 2 <= fpr <= TARGET * 2, fpr


def test_csv_flags_scans_and_names_the_calibration(flow: dict[str, Path]) -> None:
    cal = stored(flow["db"])
    rows = rows_of(flow["csv"])
    assert len(rows) == N_HELD_OUT + N_LESION
    for row in rows.values():
        assert row["status"] == "ok" and row["calibration"] == "phantom@1"
        assert Path(row["mask_path"]).is_file()
        assert row["flagged"] == str(float(row["score"]) >= cal["scan"])
    assert all(rows[f"lesion{i}"]["flagged"] == "True" for i in range(N_LESION))


def test_findings_are_stored_with_exact_native_volumes(flow: dict[str, Path]) -> None:
    store = open_store(str(flow["db"]))
    try:
        with store.session() as s:
            findings = findings_table(s)
    finally:
        store.close()
    assert findings
    by_scan: dict[str, list[int]] = {}
    for f in findings:
        native = read(f["path"])[1]  # the scan's own header affine (stored in float32, so not exactly AFFINE)
        voxel_ml = abs(np.linalg.det(native[:3, :3])) / 1000.0
        assert voxel_ml == pytest.approx(VOXEL_ML, rel=1e-6)
        assert f["volume_ml"] == pytest.approx(f["n_voxels"] * voxel_ml, rel=1e-12)
        assert f["region_centroid"] is None  # phantoms are not in MNI space
        by_scan.setdefault(f["name"], []).append(f["n_voxels"])
    structure = np.ones((3, 3, 3), dtype=bool)
    for mask_path in sorted(flow["out"].glob("*_mask.nii.gz")):
        name = mask_path.name.removesuffix("_mask.nii.gz")
        labels, n = ndimage.label(read(mask_path)[0] > 0, structure=structure)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        expected = sorted(int(c) for c in sizes if c * VOXEL_ML >= 0.05 * (1 - 1e-6))
        assert sorted(by_scan.get(name, [])) == expected, name
    for i in range(N_LESION):  # every lesion is found (the in-plane median filter rounds off its rim)
        lesion = read(flow["root"] / "labels" / f"lesion{i}.nii.gz")[0] > 0
        mask = read(flow["out"] / f"lesion{i}_mask.nii.gz")[0] > 0
        assert np.count_nonzero(mask & lesion) >= 0.5 * lesion.sum()
        assert max(by_scan[f"lesion{i}"]) >= 0.5 * lesion.sum()


def test_too_few_healthy_scans_are_refused(flow: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    two = [str(flow["root"] / "cal" / f"h0{i}.nii.gz") for i in range(2)]
    base = ["calibrate", "--db", str(flow["db"]), "--model", "intensity", "--healthy", *two, "--name", "few",
            "--quiet", "--out", str(flow["root"] / "few")]
    assert main([*base, "--target-fpr", "0.01", "--scan-target-fpr", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "too few healthy scans for scan_target_fpr=0.1" in err and "at least 10" in err
    assert main([*base, "--target-fpr", "0.0005"]) == 2
    assert "too few healthy brain voxels for target_fpr=0.0005" in capsys.readouterr().err
    store = open_store(str(flow["db"]))
    try:
        with store.session() as s:
            assert "few" not in {c.name for c in list_calibrations(s)}
    finally:
        store.close()


def test_labelled_calibration_without_lesions_is_refused(flow: dict[str, Path],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    labels = flow["root"] / "empty_labels"
    for i in range(2):
        write_nifti(labels / f"h0{i}.nii.gz", np.zeros(SHAPE, np.uint8), AFFINE, dtype=np.uint8)
    two = [str(flow["root"] / "cal" / f"h0{i}.nii.gz") for i in range(2)]
    code = main(["calibrate", "--db", str(flow["db"]), "--model", "intensity", "--scans", *two, "--labels",
                 str(labels), "--name", "nolesion", "--quiet", "--out", str(flow["root"] / "few")])
    assert code == 2
    assert "holds no lesion voxels" in capsys.readouterr().err


def test_labelled_calibration_maximises_pooled_dice(flow: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", "--db", str(flow["db"]), "--model", "intensity", "--scans",
                 *[str(flow["root"] / "test" / f"lesion{i}.nii.gz") for i in range(N_LESION)],
                 "--labels", str(flow["root"] / "labels"), "--name", "dice", "--quiet"]) == 0
    assert "dice@1" in capsys.readouterr().out
    cal = stored(flow["db"], "dice")
    values, truth = [], []
    for i in range(N_LESION):
        map_path = flow["root"] / "calibration" / "dice" / f"lesion{i}_anomaly.nii.gz"
        brain = brain_of(map_path)
        values.append(read(map_path)[0][brain])
        truth.append((read(flow["root"] / "labels" / f"lesion{i}.nii.gz")[0] > 0)[brain])
    v, t = np.concatenate(values), np.concatenate(truth)
    order = np.argsort(-v, kind="stable")  # descending scores; counts at each distinct value by position
    ordered, hits = v[order], np.cumsum(t[order])
    candidates = np.unique(v)
    n_at_or_above = np.searchsorted(-ordered, -candidates, side="right")
    dice = 2 * hits[n_at_or_above - 1] / (n_at_or_above + t.sum())
    best = dice.max()
    assert cal["metrics"]["best_dice"] == pytest.approx(best, rel=1e-12)
    assert cal["voxel"] == pytest.approx(candidates[dice == best].max(), rel=1e-7)
    assert cal["method"] == "labelled-dice" and cal["scan"] is None  # only abnormal scans: no scan threshold


def test_other_scoring_settings_are_refused(flow: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    config = flow["root"] / "median3.yaml"
    config.write_text("postprocess:\n  median_size: 3\n")
    code = main(["score", str(flow["root"] / "test" / "healthy0.nii.gz"), "--out", str(flow["root"] / "other"),
                 "--model", "intensity", "--db", str(flow["db"]), "--calibration", "phantom@1", "--config",
                 str(config), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "postprocess.median_size: None -> 3" in err and "calibrate again" in err

    from anomaly.config import load_scoring_settings
    from anomaly.models import load_model
    from pipelines.batch import score_batch

    store = open_store(str(flow["db"]))
    try:
        summary = score_batch([flow["root"] / "test" / "healthy0.nii.gz"], flow["root"] / "other",
                              load_model("intensity"), store, load_scoring_settings(config), calibration="phantom",
                              progress=False, force_calibration=True)
    finally:
        store.close()
    assert summary.rows[0]["status"] == "ok" and summary.rows[0]["calibration"] == "phantom@1"
    assert "warning: calibration phantom@1 was made on maps scored with other settings" in capsys.readouterr().err


def test_list_shows_stored_calibrations(flow: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", "--db", str(flow["db"]), "--list"]) == 0
    out = capsys.readouterr().out
    assert "phantom@1" in out and "healthy-fpr" in out


def test_repeating_a_calibration_reuses_the_stored_version(tmp_path: Path) -> None:
    for i in range(4):
        write_nifti(tmp_path / "healthy" / f"h{i}.nii.gz", phantom(seed=i))
    args = ["calibrate", "--db", str(tmp_path / "c.db"), "--model", "intensity", "--healthy",
            str(tmp_path / "healthy"), "--target-fpr", "0.01", "--name", "again", "--bootstrap", "20", "--quiet"]
    assert main(args) == 0
    assert main(args) == 0
    assert main([*args[:-3], "--bootstrap", "21", "--quiet"]) == 0
    store = open_store(str(tmp_path / "c.db"))
    with store.session() as s:
        assert [c.version for c in list_calibrations(s)] in ([1, 2], [2, 1])
    store.close()

"""``anomaly evaluate`` on a calibrated run of phantom brains: metrics equal scikit-learn and independent
counts on the maps, masks and labels read back from disk; plots, JSON, CSV and the MOOD export are valid."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from pipelines.cli import main
from tests.conftest import phantom, write_nifti

AFFINE = np.array([[0.0, 1.2, 0.0, -35.0], [-1.0, 0.0, 0.0, 30.0], [0.0, 0.0, 1.4, -30.0], [0.0, 0.0, 0.0, 1.0]])
SHAPE = (56, 64, 48)
# (name, centre, radius, value): bright lesions the intensity baseline finds, a dark one it misses
LESIONS = [("bright", (0.35, -0.2, 0.0), 0.12, 160.0), ("faint", (-0.3, 0.25, 0.1), 0.14, 118.0),
           ("dark", (0.0, 0.4, -0.2), 0.12, 70.0)]
HEALTHY = ("calm0", "calm1")
MIN_ML = 0.05


def _blob(centre: tuple[float, float, float], radius: float) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij"))
    return np.sqrt(sum(((g - c) / radius) ** 2 for g, c in zip(grid, centre, strict=True))) < 1


def _read(path: str | Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Calibrate on 3 healthy phantoms, score 2 healthy + 3 lesioned ones with it, evaluate the run."""
    root = tmp_path_factory.mktemp("evalflow")
    for i in range(3):
        write_nifti(root / "cal" / f"h{i}.nii.gz", phantom(SHAPE, seed=50 + i), AFFINE)
    for i, name in enumerate(HEALTHY):
        write_nifti(root / "test" / f"{name}.nii.gz", phantom(SHAPE, seed=60 + i), AFFINE)
    for i, (name, centre, radius, value) in enumerate(LESIONS):
        data = phantom(SHAPE, seed=70 + i)
        blob = _blob(centre, radius)
        data[blob] = value
        write_nifti(root / "test" / "sub" / f"{name}.nii.gz", data, AFFINE)
        # the label is one voxel larger than the painted lesion, so overlap is imperfect
        label = ndimage.binary_dilation(blob)
        write_nifti(root / "labels" / f"{name}.nii.gz", label.astype(np.uint8), AFFINE, dtype=np.uint8)
    db = root / "r.db"
    assert main(["calibrate", "--db", str(db), "--model", "intensity", "--healthy", str(root / "cal"),
                 "--target-fpr", "0.02", "--scan-target-fpr", "0.34", "--name", "ev", "--bootstrap", "50",
                 "--min-volume-ml", str(MIN_ML), "--quiet"]) == 0
    assert main(["score", str(root / "test"), "--out", str(root / "out"), "--model", "intensity", "--db", str(db),
                 "--calibration", "ev", "--quiet", "--no-recon"]) == 0
    assert main(["evaluate", "--db", str(db), "--run", "2", "--labels", str(root / "labels"), "--out",
                 str(root / "eval"), "--healthy-without-labels", "--quiet"]) == 0
    return {"root": root, "db": db, "out": root / "out", "eval": root / "eval"}


def _summary(ev: dict[str, Path]) -> dict:
    def refuse(value: str) -> None:
        raise AssertionError(f"summary.json holds {value}, which is not JSON")

    return json.loads((ev["eval"] / "summary.json").read_text(), parse_constant=refuse)


def _per_scan(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {r["name"]: r for r in csv.DictReader(handle)}


def _arrays(ev: dict[str, Path], name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map, brain mask and truth (all-zero for healthy scans) as written on disk."""
    amap = _read(ev["out"] / f"{name}_anomaly.nii.gz")
    brain = _read(ev["out"] / f"{name}_brain.nii.gz") > 0
    label = ev["root"] / "labels" / f"{name}.nii.gz"
    truth = _read(label) > 0 if label.is_file() else np.zeros(SHAPE, dtype=bool)
    return amap, brain, truth


NAMES = [*HEALTHY, *(n for n, *_ in LESIONS)]


def test_voxel_auroc_and_auprc_equal_scikit_learn(evaluated: dict[str, Path]) -> None:
    summary = _summary(evaluated)
    rows = _per_scan(evaluated["eval"] / "per_scan.csv")
    scores, truths = [], []
    for name in NAMES:
        amap, brain, truth = _arrays(evaluated, name)
        scores.append(amap[brain])
        truths.append(truth[brain])
        if truth[brain].any():
            assert float(rows[name]["auroc"]) == pytest.approx(roc_auc_score(truth[brain], amap[brain]), rel=1e-12)
            assert float(rows[name]["auprc"]) == pytest.approx(
                average_precision_score(truth[brain], amap[brain]), rel=1e-9)
        else:
            assert rows[name]["auroc"] == "" and rows[name]["has_lesion"] == "False"
    v, t = np.concatenate(scores), np.concatenate(truths)
    voxel = summary["voxel"]
    assert voxel["n_voxels"] == v.size and voxel["n_lesion_voxels"] == int(t.sum())
    assert voxel["auroc"] == pytest.approx(roc_auc_score(t, v), rel=1e-12)
    assert voxel["auprc"] == pytest.approx(average_precision_score(t, v), rel=1e-9)
    assert 0.5 < voxel["auroc"] < 1.0  # the dark lesion is missed: not a trivial curve

    order = np.argsort(-v, kind="stable")
    hits = np.cumsum(t[order])
    candidates = np.unique(v)
    above = np.searchsorted(-v[order], -candidates, side="right")
    dice = 2 * hits[above - 1] / (above + t.sum())
    assert voxel["best_dice_oracle"]["dice"] == pytest.approx(dice.max(), rel=1e-12)
    assert voxel["best_dice_oracle"]["threshold"] == pytest.approx(candidates[dice == dice.max()].max(), rel=1e-7)
    assert "oracle" in voxel["best_dice_oracle"]["note"]


def test_threshold_metrics_equal_independent_counts(evaluated: dict[str, Path]) -> None:
    summary = _summary(evaluated)
    rows = _per_scan(evaluated["eval"] / "per_scan.csv")
    threshold = summary["calibration"]["voxel_threshold"]
    assert summary["calibration"]["ref"] == "ev@1" and summary["calibration"]["min_volume_ml"] == MIN_ML
    structure = np.ones((3, 3, 3), dtype=bool)
    voxel_ml = abs(np.linalg.det(nib.load(str(evaluated["out"] / "calm0_anomaly.nii.gz")).affine[:3, :3])) / 1000
    total_fp = total_neg = total_lesions = total_detected = total_fp_components = 0
    for name in NAMES:
        amap, brain, truth = _arrays(evaluated, name)
        pred = (amap >= np.float32(threshold)) & brain
        written = _read(evaluated["out"] / f"{name}_mask.nii.gz") > 0
        np.testing.assert_array_equal(pred, written)  # the evaluation's threshold is the one scoring applied
        gt = truth & brain
        tp = np.count_nonzero(pred & gt)
        fp = np.count_nonzero(pred & ~gt)
        row = rows[name]
        assert int(row["n_pred_voxels"]) == np.count_nonzero(pred)
        assert float(row["voxel_fpr"]) == pytest.approx(fp / np.count_nonzero(brain & ~gt), rel=1e-12)
        if gt.any():
            assert float(row["dice"]) == pytest.approx(2 * tp / (pred.sum() + gt.sum()), rel=1e-12)
        else:
            assert row["dice"] == ""
        pred_labels, n_pred = ndimage.label(pred, structure=structure)
        sizes = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)
        kept = np.isin(pred_labels, [i for i in range(1, n_pred + 1) if sizes[i] * voxel_ml >= MIN_ML * (1 - 1e-9)])
        gt_labels, n_gt = ndimage.label(gt, structure=structure)
        detected = len(set(np.unique(gt_labels[kept & gt])) - {0})
        kept_labels, n_kept = ndimage.label(kept, structure=structure)
        touching = len(set(np.unique(kept_labels[kept & gt])) - {0})
        assert int(row["n_lesions"]) == n_gt and int(row["n_detected"]) == detected
        assert int(row["n_false_positive_components"]) == n_kept - touching
        total_fp += fp
        total_neg += np.count_nonzero(brain & ~gt)
        total_lesions += n_gt
        total_detected += detected
        total_fp_components += n_kept - touching
    assert rows["bright"]["n_detected"] == "1" and rows["dark"]["n_detected"] == "0"
    assert summary["voxel"]["at_threshold"]["fpr"] == pytest.approx(total_fp / total_neg, rel=1e-12)
    lesion = summary["lesion"]
    assert (lesion["n_lesions"], lesion["n_detected"]) == (total_lesions, total_detected)
    assert lesion["n_false_positive_components"] == total_fp_components


def test_scan_level_auroc_equals_scikit_learn(evaluated: dict[str, Path]) -> None:
    summary = _summary(evaluated)
    rows = _per_scan(evaluated["eval"] / "per_scan.csv")
    scores = [float(rows[n]["score"]) for n in NAMES]
    abnormal = [n not in HEALTHY for n in NAMES]
    assert summary["scan"]["auroc"] == pytest.approx(roc_auc_score(abnormal, scores), rel=1e-12)
    assert (summary["scan"]["n_abnormal"], summary["scan"]["n_normal"]) == (3, 2)
    scan_threshold = summary["calibration"]["scan_threshold"]
    assert all(rows[n]["flagged"] == str(float(rows[n]["score"]) >= scan_threshold) for n in NAMES)


def test_plots_json_and_mood_export_are_valid(evaluated: dict[str, Path]) -> None:
    summary = _summary(evaluated)
    for plot in ("roc.png", "pr.png", "dice_threshold.png", "scan_scores.png"):
        data = (evaluated["eval"] / plot).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000, plot
    assert Path(summary["files"]["per_scan"]).is_file()
    mood = evaluated["eval"] / "mood"
    assert sorted(p.name for p in (mood / "pixel").iterdir()) == sorted(f"{n}.nii.gz" for n in NAMES)
    assert sorted(p.name for p in (mood / "sample").iterdir()) == sorted(f"{n}.nii.gz.txt" for n in NAMES)
    samples = {}
    for name in NAMES:
        image = nib.load(str(mood / "pixel" / f"{name}.nii.gz"))
        values = np.asarray(image.dataobj)
        source = nib.load(str(evaluated["out"] / f"{name}_anomaly.nii.gz"))
        assert values.shape == source.shape and np.allclose(image.affine, source.affine, atol=1e-5)
        assert values.min() >= 0.0 and values.max() <= 1.0
        brain = np.asarray(source.dataobj) > 0
        assert np.corrcoef(values[brain], np.asarray(source.dataobj)[brain])[0, 1] > 0.999  # a rescaling
        text = (mood / "sample" / f"{name}.nii.gz.txt").read_text().split()
        assert len(text) == 1 and 0.0 <= float(text[0]) <= 1.0
        samples[name] = float(text[0])
    rows = _per_scan(evaluated["eval"] / "per_scan.csv")
    by_score = sorted(NAMES, key=lambda n: float(rows[n]["score"]))
    assert [samples[n] for n in by_score] == sorted(samples.values())


def test_scans_without_labels_are_left_out_unless_asked(evaluated: dict[str, Path],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out, mood = evaluated["root"] / "eval_labelled", evaluated["root"] / "mood_elsewhere"
    assert main(["evaluate", "--db", str(evaluated["db"]), "--run", "latest", "--labels",
                 str(evaluated["root"] / "labels"), "--out", str(out), "--mood", str(mood), "--quiet"]) == 0
    assert "2 scan(s) without a label file" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run_id"] == 2  # the scoring run, the latest one
    assert summary["scans"]["evaluated"] == 3 and summary["scans"]["skipped_without_labels"] == 2
    assert summary["scan"]["auroc"] is None  # only abnormal scans were evaluated
    rows = _per_scan(out / "per_scan.csv")
    assert {n: r["status"] for n, r in rows.items()} == {**dict.fromkeys(HEALTHY, "skipped"),
                                                          **{n: "evaluated" for n, *_ in LESIONS}}
    assert len(list((mood / "sample").iterdir())) == len(NAMES)  # the MOOD export holds every scored scan
    assert not math.isnan(summary["voxel"]["auroc"])


def test_missing_labels_and_unknown_run_are_clear_errors(evaluated: dict[str, Path],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    empty = evaluated["root"] / "no_labels"
    empty.mkdir()
    base = ["evaluate", "--db", str(evaluated["db"]), "--labels", str(empty), "--quiet"]
    assert main([*base, "--run", "2"]) == 2
    assert "no scan of run 2 has a label file" in capsys.readouterr().err
    assert main([*base, "--run", "99"]) == 2
    assert "run 99 does not exist" in capsys.readouterr().err


def test_evaluation_records_label_paths_for_the_dashboard(tmp_path: Path) -> None:
    from sqlalchemy import select

    from anomaly.store import open_store
    from anomaly.store.schema import Result

    data = phantom(lesion=True)
    write_nifti(tmp_path / "in" / "sick.nii.gz", data)
    write_nifti(tmp_path / "labels" / "sick.nii.gz", (data > 150).astype(np.uint8), dtype=np.uint8)
    db = tmp_path / "e.db"
    assert main(["score", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--model", "intensity",
                "--db", str(db), "--quiet"]) == 0
    assert main(["evaluate", "--db", str(db), "--run", "latest", "--labels", str(tmp_path / "labels"),
                "--quiet"]) == 0
    store = open_store(str(db))
    with store.session() as s:
        details = s.scalars(select(Result)).one().details
    store.close()
    assert Path(details["label_path"]) == (tmp_path / "labels" / "sick.nii.gz").resolve()

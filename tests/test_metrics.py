"""Metrics against scikit-learn and brute force; evaluation figures; MOOD export layout."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from sklearn import metrics as skm

from anomaly import metrics as M
from anomaly.mood import MoodItem, export_mood


def _tied_data(seed: int, n: int = 2000, levels: int = 40, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < rng.uniform(0.05, 0.6)
    scores = (rng.integers(0, levels, n) + 3 * labels * rng.random(n)).round(1).astype(dtype)
    labels[:2] = [True, False]
    return scores, labels


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_auroc_auprc_match_sklearn_with_ties(seed: int, dtype) -> None:
    scores, labels = _tied_data(seed, dtype=dtype)
    assert np.unique(scores).size < scores.size / 3  # many ties
    assert M.auroc(scores, labels) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-9)
    assert M.auprc(scores, labels) == pytest.approx(skm.average_precision_score(labels, scores), abs=1e-9)


def test_curves_match_sklearn() -> None:
    scores, labels = _tied_data(7)
    fpr, tpr, thr = M.roc_curve(scores, labels)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
    assert thr[0] == np.inf
    np.testing.assert_allclose(thr[1:], sk_thr[1:])

    precision, recall, pthr = M.pr_curve(scores, labels)
    sk_p, sk_r, sk_t = skm.precision_recall_curve(labels, scores)
    n = sk_t.size  # scikit-learn lists increasing thresholds and appends the (recall 0, precision 1) point
    np.testing.assert_allclose(pthr[:n], sk_t[::-1])
    np.testing.assert_allclose(precision[:n], sk_p[:-1][::-1], atol=1e-12)
    np.testing.assert_allclose(recall[:n], sk_r[:-1][::-1], atol=1e-12)


def test_scan_auroc_and_one_class_refusals() -> None:
    scores = [0.1, 0.4, 0.35, 0.8, 0.8, 0.2]
    labels = [False, True, False, True, False, False]
    assert M.scan_auroc(scores, labels) == pytest.approx(skm.roc_auc_score(labels, scores))
    with pytest.raises(ValueError, match="1 abnormal and 0 normal"):
        M.scan_auroc([0.3], [True])
    with pytest.raises(ValueError, match="no positives"):
        M.auroc([0.1, 0.2], [False, False])
    with pytest.raises(ValueError, match="no positives"):
        M.auprc([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="3 labels for 2 scores"):
        M.auroc([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match="NaN"):
        M.auroc([0.1, np.nan], [0, 1])


def test_dice_definitions() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert M.dice(a, b) == 1.0  # both empty: defined as perfect agreement
    b[0, :2] = True
    assert M.dice(a, b) == 0.0
    a[0, 1:4] = True  # |A| = 3, |B| = 2, overlap 1
    assert M.dice(a, b) == pytest.approx(2 * 1 / 5)
    with pytest.raises(ValueError, match="shape"):
        M.dice(a, b[:2])


@pytest.mark.parametrize("seed", range(4))
def test_best_dice_and_dice_curve_equal_brute_force(seed: int) -> None:
    scores, labels = _tied_data(seed, n=600, levels=25)
    brute = {float(t): M.dice(scores >= t, labels) for t in np.unique(scores)}
    thresholds, dice = M.dice_curve(scores, labels)
    assert np.all(np.diff(thresholds) < 0)
    assert dict(zip(thresholds.tolist(), dice.tolist(), strict=True)) == pytest.approx(brute, abs=1e-12)
    best, t = M.best_dice(scores, labels)
    top = max(brute.values())
    assert best == pytest.approx(top, abs=1e-12)
    assert t == max(k for k, v in brute.items() if abs(v - top) < 1e-12)  # highest threshold on ties


def test_threshold_semantics_exact_for_float32() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.7], dtype=np.float32)
    ranked = M.RankedScores.from_arrays(scores, [False, False, True, True])
    at = float(scores[2])  # 0.3 as float32, widened
    assert ranked.operating_point(at)["tp"] == 2
    assert ranked.operating_point(np.nextafter(at, 1.0))["tp"] == 1  # just above: excluded
    assert ranked.threshold_for_sensitivity(1.0) == at
    assert ranked.threshold_for_sensitivity(0.5) == pytest.approx(0.7)


def _ball(shape: tuple[int, int, int], centre: tuple[float, float, float], radius: float) -> np.ndarray:
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2


def test_lesion_detection_counts() -> None:
    shape = (40, 40, 40)
    gt = _ball(shape, (10, 10, 10), 4) | _ball(shape, (30, 30, 30), 3) | _ball(shape, (10, 30, 20), 3)
    pred = _ball(shape, (12, 10, 10), 2)  # overlaps lesion 1
    pred |= _ball(shape, (30, 32, 30), 2)  # overlaps lesion 2
    pred |= _ball(shape, (30, 8, 8), 2)  # false positive
    pred[0, 0, 0] = True  # single-voxel false positive
    stats = M.lesion_detection(pred, gt)
    assert stats == M.LesionStats(n_lesions=3, n_detected=2, sensitivity=pytest.approx(2 / 3),
                                  n_false_positive_components=2)
    pooled = stats + M.lesion_detection(np.zeros(shape, bool), np.zeros(shape, bool))
    assert (pooled.n_lesions, pooled.n_detected, pooled.n_false_positive_components) == (3, 2, 2)
    assert M.lesion_detection(np.zeros(shape, bool), np.zeros(shape, bool)).sensitivity is None


def test_lesion_detection_connectivity() -> None:
    gt = np.zeros((6, 6, 6), bool)
    gt[1, 1, 1] = gt[2, 2, 2] = True  # two voxels touching at a corner only
    pred = np.zeros_like(gt)
    pred[1, 1, 1] = True
    assert M.lesion_detection(pred, gt, connectivity=3).n_lesions == 1  # 26-neighbours: one lesion
    six = M.lesion_detection(pred, gt, connectivity=1)
    assert (six.n_lesions, six.n_detected) == (2, 1)


def test_library_imports_neither_sklearn_nor_pyplot() -> None:
    code = (
        "import sys, numpy as np\n"
        "import anomaly.metrics, anomaly.calibration, anomaly.findings, anomaly.atlas, anomaly.mood, anomaly.plots\n"
        "m = np.zeros((20, 20, 20), bool); m[5:15, 5:15, 5:15] = True\n"
        "anomaly.atlas.is_mni_space(m, np.eye(4))\n"
        "fig = anomaly.plots.plot_roc(np.array([0, 1.0]), np.array([0, 1.0]))\n"
        "assert 'sklearn' not in sys.modules, 'sklearn imported'\n"
        "assert 'nilearn' not in sys.modules, 'nilearn imported'\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_plots_write_png(tmp_path) -> None:
    from anomaly import plots

    scores, labels = _tied_data(3)
    fpr, tpr, _ = M.roc_curve(scores, labels)
    precision, recall, _ = M.pr_curve(scores, labels)
    thresholds, dice = M.dice_curve(scores, labels)
    figures = {
        "roc": plots.plot_roc(fpr, tpr, auc=M.auroc(scores, labels), operating_point=(0.1, 0.5)),
        "pr": plots.plot_pr(precision, recall, ap=M.auprc(scores, labels), prevalence=float(labels.mean())),
        "dice": plots.plot_dice_curve(thresholds, dice, best=M.best_dice(scores, labels), threshold=10.0),
        "hist": plots.plot_score_histogram(scores[:50], threshold=12.0, labels=labels[:50]),
    }
    assert "AUROC" in figures["roc"].axes[0].get_legend().get_texts()[0].get_text()
    for name, fig in figures.items():
        path = plots.save_figure(fig, tmp_path / "figs" / f"{name}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["dice.png", "hist.png", "pr.png", "roc.png"]
    with pytest.raises(ValueError, match="labels"):
        plots.plot_score_histogram([1.0, 2.0], labels=[True])


def test_mood_export_layout_and_order(tmp_path) -> None:
    rng = np.random.default_rng(0)
    affine = np.diag([1.2, 1.0, 2.0, 1.0])
    affine[:3, 3] = [-10, 5, 3]
    maps = [rng.gamma(2.0, 1.0, (8, 9, 10)).astype(np.float32) for _ in range(3)]
    maps[1] *= 3  # a hotter scan: its values must stay above the others after rescaling
    items = [MoodItem(f"case{i}.nii.gz" if i == 0 else f"case{i}", m, affine, s)
             for i, (m, s) in enumerate(zip(maps, [0.5, 7.0, -1.0], strict=True))]
    written = export_mood(items, tmp_path / "out")
    assert sorted(written) == ["case0", "case1", "case2"]
    pooled_in, pooled_out = [], []
    for i, m in enumerate(maps):
        image = nib.load(tmp_path / "out" / "pixel" / f"case{i}.nii.gz")
        out = np.asarray(image.dataobj)
        assert out.dtype == np.float32 and out.shape == m.shape
        np.testing.assert_allclose(image.affine, affine)
        assert out.min() >= 0.0 and out.max() <= 1.0
        pooled_in.append(m.ravel())
        pooled_out.append(out.ravel())
    pin, pout = np.concatenate(pooled_in), np.concatenate(pooled_out)
    order = np.argsort(pin, kind="stable")
    assert np.all(np.diff(pout[order]) >= 0)  # order kept across scans
    assert pout.max() == 1.0 and pout.min() == 0.0
    samples = [float((tmp_path / "out" / "sample" / f"case{i}.nii.gz.txt").read_text()) for i in range(3)]
    assert samples == pytest.approx([1.5 / 8.0, 1.0, 0.0])

    clipped = export_mood(items[:1], tmp_path / "clip", pixel_range=(0.0, 1.0), sample_range=(0.0, 1.0))
    out = np.asarray(nib.load(clipped["case0"]["pixel"]).dataobj)
    np.testing.assert_allclose(out, np.clip(maps[0], 0, 1), rtol=1e-6)
    with pytest.raises(ValueError, match="more than once"):
        export_mood([items[0], items[0]], tmp_path / "dup")
    with pytest.raises(ValueError, match="plain file name"):
        export_mood([MoodItem("a/b", maps[0], affine, 1.0)], tmp_path / "bad")

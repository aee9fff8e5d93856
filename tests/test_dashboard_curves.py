"""Calibration-page curves: scan labels from verdicts and voxel curves, checked against independent computations."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from dashboard.curves import operating_point, scan_curves, verdict_labels, voxel_curves


def row(score: float | None, verdict: str | None, status: str = "ok") -> SimpleNamespace:
    return SimpleNamespace(score=score, verdict=verdict, status=status)


def test_verdicts_become_scan_labels() -> None:
    labels = verdict_labels(
        [
            row(0.9, "confirmed finding"),
            row(0.2, "normal"),
            row(0.6, "false positive"),
            row(0.5, "artefact"),
            row(0.4, "unsure"),
            row(0.3, None),
            row(None, "normal"),
            row(0.8, "confirmed finding", status="failed"),
        ]
    )
    assert labels.scores.tolist() == [0.9, 0.2, 0.6]
    assert labels.labels.tolist() == [True, False, False]
    assert (labels.n_excluded, labels.n_unreviewed, labels.usable) == (2, 1, True)
    assert not verdict_labels([row(0.9, "confirmed finding")]).usable


def test_scan_curves_match_scikit_learn() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    scores = np.r_[rng.normal(1.0, 1.0, 40), rng.normal(0.0, 1.0, 60)].round(1)  # with ties
    verdicts = ["confirmed finding"] * 40 + ["normal"] * 30 + ["false positive"] * 30
    labels = verdict_labels([row(float(s), v) for s, v in zip(scores, verdicts, strict=True)])
    curves = scan_curves(labels)
    truth = np.r_[np.ones(40, bool), np.zeros(60, bool)]
    assert curves["auroc"] == pytest.approx(sklearn_metrics.roc_auc_score(truth, scores))
    assert curves["auprc"] == pytest.approx(sklearn_metrics.average_precision_score(truth, scores))
    assert curves["fpr"][0] == 0.0 and curves["tpr"][-1] == 1.0 and len(curves["fpr"]) <= 400
    with pytest.raises(ValueError, match="abnormal and normal"):
        scan_curves(verdict_labels([row(0.1, "normal")]))


def test_operating_point_counts() -> None:
    point = operating_point(np.array([0.9, 0.6, 0.4, 0.1]), np.array([True, False, True, False]), 0.5)
    assert (point["n_flagged"], point["tp"], point["fp"]) == (2, 1, 1)
    assert (point["sensitivity"], point["fpr"], point["precision"]) == (0.5, 0.5, 0.5)


def test_voxel_curves_pool_the_brain_and_find_the_best_dice() -> None:
    rng = np.random.default_rng(0)
    maps, labels = [], []
    for _ in range(3):
        values = np.zeros((20, 20, 20), np.float32)
        values[2:18, 2:18, 2:18] = rng.uniform(0.0, 0.5, (16, 16, 16))
        lesion = np.zeros_like(values, dtype=bool)
        lesion[8:12, 8:12, 8:12] = True
        values[lesion] = rng.uniform(0.4, 1.0, lesion.sum())
        maps.append(values.round(2))  # ties, and few enough distinct values for the brute force below
        labels.append(lesion.astype(np.uint8))
    curves = voxel_curves(list(zip(maps, labels, strict=True)))
    pooled = np.concatenate([m.ravel() for m in maps])
    truth = np.concatenate([lab.ravel() > 0 for lab in labels])
    # best Dice by brute force over every distinct value
    best = max(
        2 * np.sum((pooled >= t) & truth) / (np.sum(pooled >= t) + truth.sum()) for t in np.unique(pooled)
    )
    assert curves.best_dice == pytest.approx(best)
    t = 0.45
    expected = 2 * np.sum((pooled >= t) & truth) / (np.sum(pooled >= t) + truth.sum())
    grid_t = curves.thresholds[int(np.argmin(np.abs(curves.thresholds - t)))]
    at_grid = 2 * np.sum((pooled >= grid_t) & truth) / (np.sum(pooled >= grid_t) + truth.sum())
    assert curves.dice_at(t) == pytest.approx(at_grid) and abs(at_grid - expected) < 0.05
    # negatives are the non-zero (brain) voxels only: the zero background does not inflate them
    brain = pooled != 0
    assert curves.auroc == pytest.approx(
        pytest.importorskip("sklearn.metrics").roc_auc_score(truth[brain | truth], pooled[brain | truth])
    )
    assert curves.n_lesion_voxels == truth.sum() and curves.n_scans == 3


def test_voxel_curves_count_exactly_the_scored_brain_when_its_mask_is_given() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    values = rng.uniform(0.0, 1.0, (12, 12, 12)).astype(np.float32)
    values[:3] = 0.0  # brain voxels whose map value is exactly zero still count as negatives
    label = np.zeros(values.shape, np.uint8)
    label[5:8, 5:8, 5:8] = 1
    label[0, 0, 0] = 1  # a lesion voxel outside the brain is not counted
    brain = np.zeros(values.shape, np.uint8)
    brain[:, 1:11, 1:11] = 1
    curves = voxel_curves([(values, label, brain)])
    inside = brain > 0
    assert curves.n_lesion_voxels == int((label > 0)[inside].sum()) == 27
    assert curves.auroc == pytest.approx(sklearn_metrics.roc_auc_score(label[inside] > 0, values[inside]))
    assert curves.auprc == pytest.approx(
        sklearn_metrics.average_precision_score(label[inside] > 0, values[inside]), abs=1e-9)
    with pytest.raises(ValueError, match="brain mask shape"):
        voxel_curves([(values, label, brain[:-1])])


def test_voxel_curves_refuse_labels_without_lesions_and_bad_shapes() -> None:
    values = np.ones((4, 4, 4), np.float32)
    with pytest.raises(ValueError, match="no lesion voxel"):
        voxel_curves([(values, np.zeros((4, 4, 4)))])
    with pytest.raises(ValueError, match="label shape"):
        voxel_curves([(values, np.zeros((4, 4, 5)))])

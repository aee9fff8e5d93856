"""Curves of the calibration page: scan-level ROC/PR from reviewers' verdicts, and voxel-level ROC/PR
and Dice-versus-threshold from label masks recorded with the results.

Scan labels come from the latest verdict of each scored scan: ``confirmed finding`` is abnormal;
``normal`` and ``false positive`` (the scan holds no real abnormality) are normal; ``artefact``,
``unsure`` and unreviewed scans are left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from anomaly.calibration import at_or_above
from anomaly.metrics import RankedScores, pr_curve, roc_curve

POSITIVE_VERDICTS: tuple[str, ...] = ("confirmed finding",)
NEGATIVE_VERDICTS: tuple[str, ...] = ("normal", "false positive")
MAX_POINTS = 400
"""Points drawn per curve (thresholds are subsampled evenly for plotting; summaries stay exact)."""


@dataclass(frozen=True)
class ScanLabels:
    """Scores of the scans with a usable verdict and their labels (True = abnormal)."""

    scores: np.ndarray
    labels: np.ndarray
    n_excluded: int
    """Reviewed scans whose verdict says nothing about abnormality (artefact, unsure)."""
    n_unreviewed: int = 0

    @property
    def n_pos(self) -> int:
        """Abnormal scans."""
        return int(self.labels.sum())

    @property
    def n_neg(self) -> int:
        """Normal scans."""
        return int((~self.labels).sum())

    @property
    def usable(self) -> bool:
        """Whether ROC and PR are defined (at least one scan of each kind)."""
        return self.n_pos > 0 and self.n_neg > 0


def verdict_labels(rows: Iterable[Any]) -> ScanLabels:
    """Scan labels from rows with ``score``, ``status`` and ``verdict`` (e.g. ``ResultRow``)."""
    scores, labels, excluded, unreviewed = [], [], 0, 0
    for row in rows:
        if row.status != "ok" or row.score is None or not np.isfinite(row.score):
            continue
        if row.verdict in POSITIVE_VERDICTS:
            labels.append(True)
        elif row.verdict in NEGATIVE_VERDICTS:
            labels.append(False)
        else:
            if row.verdict is None:
                unreviewed += 1
            else:
                excluded += 1
            continue
        scores.append(float(row.score))
    return ScanLabels(
        np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool), excluded, unreviewed
    )


def labels_of_verdicts(scores: Sequence[float], verdicts: Sequence[str], n_unreviewed: int) -> ScanLabels:
    """Scan labels from the scores and current verdicts of reviewed scans (``n_unreviewed`` others)."""
    rows = [_Reviewed(score, verdict) for score, verdict in zip(scores, verdicts, strict=True)]
    labels = verdict_labels(rows)
    return ScanLabels(labels.scores, labels.labels, labels.n_excluded, n_unreviewed)


@dataclass(frozen=True)
class _Reviewed:
    score: float
    verdict: str
    status: str = "ok"


def _thin(*arrays: np.ndarray, limit: int = MAX_POINTS) -> list[np.ndarray]:
    n = len(arrays[0])
    if n <= limit:
        return list(arrays)
    keep = np.unique(np.linspace(0, n - 1, limit).round().astype(int))
    return [a[keep] for a in arrays]


def scan_curves(labels: ScanLabels) -> dict[str, Any]:
    """ROC and PR curves (thinned for drawing) with exact AUROC and AUPRC; needs both kinds of scan."""
    if not labels.usable:
        raise ValueError(
            f"scan-level curves need abnormal and normal scans; have {labels.n_pos} and {labels.n_neg}"
        )
    ranked = RankedScores.from_arrays(labels.scores, labels.labels)
    fpr, tpr, roc_t = roc_curve(labels.scores, labels.labels)
    precision, recall, pr_t = pr_curve(labels.scores, labels.labels)
    fpr, tpr, roc_t = _thin(fpr, tpr, roc_t)
    precision, recall, pr_t = _thin(precision, recall, pr_t)
    return {
        "fpr": fpr,
        "tpr": tpr,
        "roc_thresholds": roc_t,
        "precision": precision,
        "recall": recall,
        "pr_thresholds": pr_t,
        "auroc": ranked.auroc(),
        "auprc": ranked.auprc(),
    }


def operating_point(
    scores: np.ndarray, labels: np.ndarray, threshold: float
) -> dict[str, float | int | None]:
    """Counts and rates of the rule ``score >= threshold`` (rates None when undefined)."""
    flagged = at_or_above(scores, threshold)
    truth = np.asarray(labels, dtype=bool)
    tp, fp = int((flagged & truth).sum()), int((flagged & ~truth).sum())
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    return {
        "threshold": float(threshold),
        "n_flagged": int(flagged.sum()),
        "tp": tp,
        "fp": fp,
        "sensitivity": tp / n_pos if n_pos else None,
        "fpr": fp / n_neg if n_neg else None,
        "precision": tp / (tp + fp) if tp + fp else None,
    }


@dataclass(frozen=True)
class VoxelCurves:
    """Pooled voxel-level curves over labelled scans at a grid of thresholds, and exact summaries."""

    thresholds: np.ndarray
    dice: np.ndarray
    sensitivity: np.ndarray
    fpr: np.ndarray
    precision: np.ndarray
    best_dice: float
    best_threshold: float
    auroc: float | None
    auprc: float
    n_scans: int
    n_lesion_voxels: int

    def dice_at(self, threshold: float) -> float:
        """Pooled Dice at the grid threshold nearest to ``threshold``."""
        return float(self.dice[int(np.argmin(np.abs(self.thresholds - threshold)))])


def voxel_curves(
    pairs: Sequence[tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    points: int = MAX_POINTS,
) -> VoxelCurves:
    """Curves from (anomaly map, label mask[, scored brain mask]) on one grid per scan.

    With the brain mask (``<stem>_brain.nii.gz``) voxels are pooled inside it, exactly as ``anomaly
    evaluate`` counts them; without it (results scored before brain masks were written) the region
    is approximated as "map non-zero or labelled", since maps are zero outside the scored brain.
    """
    positives, negatives = [], []
    for i, item in enumerate(pairs):
        values = np.asarray(item[0], dtype=np.float32)
        truth = np.asarray(item[1]) > 0
        brain = item[2] if len(item) > 2 else None
        if truth.shape != values.shape:
            raise ValueError(
                f"labelled scan #{i}: label shape {truth.shape} differs from map shape {values.shape}"
            )
        if brain is not None:
            region = np.asarray(brain) > 0
            if region.shape != values.shape:
                raise ValueError(
                    f"labelled scan #{i}: brain mask shape {region.shape} differs from map shape {values.shape}"
                )
        else:
            region = (values != 0) | truth
        finite = np.isfinite(values)
        positives.append(values[region & truth & finite])
        negatives.append(values[region & ~truth & finite])
    ranked = RankedScores.from_parts(positives, negatives)
    if ranked.n_pos == 0:
        raise ValueError("the label masks of these scans hold no lesion voxel; Dice is undefined")
    best, best_t = ranked.best_dice()
    high = float(ranked.thresholds[-1])
    low = float(ranked.thresholds[0])
    grid = np.unique(np.concatenate([np.linspace(low, high, points), [best_t]]))[::-1]
    tp, fp = ranked.counts_at(grid)
    dice = 2.0 * tp / (tp + fp + ranked.n_pos)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 1.0)
    fpr = fp / ranked.n_neg if ranked.n_neg else np.zeros_like(grid)
    return VoxelCurves(
        thresholds=grid,
        dice=dice,
        sensitivity=tp / ranked.n_pos,
        fpr=fpr,
        precision=precision,
        best_dice=best,
        best_threshold=best_t,
        auroc=ranked.auroc() if ranked.n_neg else None,
        auprc=ranked.auprc(),
        n_scans=len(pairs),
        n_lesion_voxels=ranked.n_pos,
    )

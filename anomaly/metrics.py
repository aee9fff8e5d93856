"""Evaluation metrics on flat voxel or scan scores: ROC/PR curves, AUROC, AUPRC, Dice and lesion detection.

Every threshold metric uses the rule ``score >= t`` is positive. Curves and their summaries are exact:
the scores are split by label and sorted once (:class:`RankedScores`), then true/false positive
counts at each distinct score come from binary searches, in chunks, so a pooled set of 10^8 voxels
needs about one extra copy of the scores plus the distinct values, never a per-voxel index array.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

CHUNK = 1 << 21
"""Distinct thresholds handled per step when curves are accumulated."""


def _as_scores(scores: np.ndarray | Sequence[float], what: str = "scores") -> np.ndarray:
    """Flat floating view of ``scores`` (float32 kept, integers and bools widened to float64)."""
    array = np.asarray(scores)
    if array.dtype.kind != "f":
        array = array.astype(np.float64)
    elif array.dtype.itemsize < 4:
        array = array.astype(np.float32)
    array = array.reshape(-1)
    if array.size and not np.isfinite(array).all():
        raise ValueError(f"{what}: holds NaN or infinite values; replace them (e.g. np.nan_to_num) before evaluating")
    return array


def _as_labels(labels: np.ndarray | Sequence[bool], size: int, what: str = "labels") -> np.ndarray:
    """Flat boolean labels (anything non-zero is positive), checked against the number of scores."""
    array = np.asarray(labels)
    array = (array if array.dtype == bool else array != 0).reshape(-1)
    if array.size != size:
        raise ValueError(f"{what}: {array.size} labels for {size} scores; pass one label per score")
    return array


def _distinct_sorted(values: np.ndarray) -> np.ndarray:
    """Distinct values of an ascending array (no re-sort)."""
    if values.size == 0:
        return values
    keep = np.empty(values.size, dtype=bool)
    keep[0] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def cast_thresholds(thresholds: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Thresholds in the scores' dtype that keep ``score >= t`` exact (rounded up, never down).

    Searching float32 scores with float64 thresholds would make numpy copy the scores to float64, and
    comparing them with a Python float would round the threshold to the nearest float32 (either way).
    """
    dtype = np.dtype(dtype)
    if thresholds.dtype == dtype or dtype.kind != "f":
        return thresholds
    cast = np.atleast_1d(thresholds.astype(dtype))
    wide = np.atleast_1d(thresholds.astype(np.float64))
    low = cast.astype(np.float64) < wide
    cast[low] = np.nextafter(cast[low], dtype.type(np.inf))
    return cast.reshape(thresholds.shape)


class CurveMetrics:
    """Pooled metrics from ``chunks()`` (thresholds in decreasing order with true/false positive counts),
    shared by exact (:class:`RankedScores`) and binned (:class:`anomaly.pooled.BinnedScores`) scores."""

    @property
    def n_pos(self) -> int:
        """Number of positive scores."""
        raise NotImplementedError

    @property
    def n_neg(self) -> int:
        """Number of negative scores."""
        raise NotImplementedError

    def counts_at(self, thresholds: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """True and false positive counts of the rule ``score >= t`` at each threshold ``t``."""
        raise NotImplementedError

    def chunks(self, chunk: int = CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(thresholds, tp, fp)`` over the curve's thresholds in decreasing order."""
        raise NotImplementedError

    def curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(thresholds, tp, fp)`` at every threshold of the curve, decreasing thresholds."""
        raise NotImplementedError

    def threshold_for_sensitivity(self, sensitivity: float) -> float:
        """Highest threshold whose sensitivity (TPR) is at least ``sensitivity``."""
        raise NotImplementedError

    def _require(self, positives: bool, negatives: bool, metric: str) -> None:
        if positives and self.n_pos == 0:
            raise ValueError(f"{metric} is undefined: the labels hold no positives; evaluate on data with lesions")
        if negatives and self.n_neg == 0:
            raise ValueError(f"{metric} is undefined: the labels hold no negatives; evaluate on data with normal tissue")

    def auroc(self) -> float:
        """Area under the ROC curve by the trapezoid rule (ties count one half, as scikit-learn)."""
        self._require(True, True, "AUROC")
        exact = 2 * self.n_pos * self.n_neg < 2**62  # integer sums cannot overflow int64: exact
        total: float = 0  # sum of dfp * (tp + tp_prev)
        prev_tp = prev_fp = 0
        for _, tp, fp in self.chunks():
            tp_prev = np.concatenate([[prev_tp], tp[:-1]])
            fp_prev = np.concatenate([[prev_fp], fp[:-1]])
            if exact:
                total += int(np.dot(fp - fp_prev, tp + tp_prev))
            else:
                total += float(np.dot((fp - fp_prev).astype(np.float64), (tp + tp_prev).astype(np.float64)))
            prev_tp, prev_fp = int(tp[-1]), int(fp[-1])
        return total / (2.0 * self.n_pos * self.n_neg)

    def auprc(self) -> float:
        """Average precision: sum over distinct thresholds of (R_k - R_{k-1}) * P_k, as scikit-learn."""
        self._require(True, False, "AUPRC")
        total = 0.0
        prev_tp = 0
        for _, tp, fp in self.chunks():
            tp_prev = np.concatenate([[prev_tp], tp[:-1]])
            precision = tp / (tp + fp)
            total += float(np.dot(tp - tp_prev, precision))
            prev_tp = int(tp[-1])
        return total / self.n_pos

    def best_dice(self) -> tuple[float, float]:
        """Largest pooled Dice over the curve's thresholds and its threshold (the highest on ties)."""
        self._require(True, False, "best Dice")
        best, best_t = -1.0, math.inf
        for thresholds, tp, fp in self.chunks():
            dice = 2.0 * tp / (tp + fp + self.n_pos)
            i = int(np.argmax(dice))
            if dice[i] > best:
                best, best_t = float(dice[i]), float(thresholds[i])
        return best, best_t

    def operating_point(self, threshold: float) -> dict[str, float]:
        """Sensitivity, precision, FPR and Dice of the rule ``score >= threshold``."""
        tp, fp = (int(c[0]) for c in self.counts_at(np.asarray([threshold], dtype=np.float64)))
        fn = self.n_pos - tp
        return {
            "threshold": float(threshold),
            "sensitivity": tp / self.n_pos if self.n_pos else math.nan,
            "precision": tp / (tp + fp) if tp + fp else 1.0,
            "fpr": fp / self.n_neg if self.n_neg else math.nan,
            "dice": 2.0 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 1.0,
            "tp": tp,
            "fp": fp,
            "fn": fn,
        }


class RankedScores(CurveMetrics):
    """Scores split into positives and negatives, each sorted ascending: the source of every curve."""

    def __init__(self, positives: np.ndarray, negatives: np.ndarray, *, copy: bool = True) -> None:
        dtype = np.result_type(positives.dtype, negatives.dtype, np.float32)
        parts = []
        for name, part in (("positive", positives), ("negative", negatives)):
            part = np.array(part, dtype=dtype, copy=copy or None).reshape(-1)
            part.sort()  # in place: the caller's array is kept unless copy=False
            if part.size and not (np.isfinite(part[0]) and np.isfinite(part[-1])):
                raise ValueError(f"RankedScores: {name} scores hold NaN or infinite values; clean them first")
            parts.append(part)
        self.positives, self.negatives = parts
        merged = np.concatenate([_distinct_sorted(self.positives), _distinct_sorted(self.negatives)])
        merged.sort(kind="stable")  # two sorted runs: a linear merge
        self.thresholds = _distinct_sorted(merged)
        """Distinct scores, ascending."""

    @classmethod
    def from_arrays(cls, scores: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[bool]) -> RankedScores:
        """Split flat ``scores`` by boolean ``labels`` (same length) and sort each part once."""
        values = _as_scores(scores)
        truth = _as_labels(labels, values.size)
        return cls(values[truth], values[~truth], copy=False)

    @classmethod
    def from_parts(cls, positives: Sequence[np.ndarray], negatives: Sequence[np.ndarray]) -> RankedScores:
        """Build from per-scan pieces (e.g. ``map[brain & lesion]`` and ``map[brain & ~lesion]``)."""
        pos = np.concatenate([np.asarray(p).reshape(-1) for p in positives]) if positives else np.empty(0)
        neg = np.concatenate([np.asarray(n).reshape(-1) for n in negatives]) if negatives else np.empty(0)
        return cls(pos, neg, copy=False)

    @property
    def n_pos(self) -> int:
        """Number of positive scores."""
        return int(self.positives.size)

    @property
    def n_neg(self) -> int:
        """Number of negative scores."""
        return int(self.negatives.size)

    def counts_at(self, thresholds: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """True and false positive counts of the rule ``score >= t`` at each threshold ``t``."""
        t = cast_thresholds(np.asarray(thresholds), self.thresholds.dtype)
        tp = self.n_pos - np.searchsorted(self.positives, t, side="left")
        fp = self.n_neg - np.searchsorted(self.negatives, t, side="left")
        return tp.astype(np.int64), fp.astype(np.int64)

    def chunks(self, chunk: int = CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(thresholds, tp, fp)`` over all distinct scores in decreasing threshold order."""
        end = self.thresholds.size
        while end > 0:
            start = max(0, end - chunk)
            part = self.thresholds[start:end][::-1]
            tp, fp = self.counts_at(part)
            yield part, tp, fp
            end = start

    def curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(thresholds, tp, fp)`` for every distinct score, decreasing thresholds."""
        thresholds = self.thresholds[::-1].copy()
        tp, fp = self.counts_at(thresholds)
        return thresholds, tp, fp

    def threshold_for_sensitivity(self, sensitivity: float) -> float:
        """Highest threshold whose sensitivity (TPR) is at least ``sensitivity``."""
        self._require(True, False, "a sensitivity operating point")
        if not 0.0 < sensitivity <= 1.0:
            raise ValueError(f"sensitivity {sensitivity!r} must lie in (0, 1]")
        needed = math.ceil(sensitivity * self.n_pos - 1e-9 * self.n_pos)
        # the needed-th largest positive score: exactly `needed` or more positives are >= it
        return float(self.positives[self.n_pos - needed])

def roc_curve(scores: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[bool]
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` at every distinct score, decreasing thresholds, led by ``(0, 0, +inf)``."""
    ranked = RankedScores.from_arrays(scores, labels)
    ranked._require(True, True, "the ROC curve")
    thresholds, tp, fp = ranked.curve()
    fpr = np.concatenate([[0.0], fp / ranked.n_neg])
    tpr = np.concatenate([[0.0], tp / ranked.n_pos])
    return fpr, tpr, np.concatenate([[np.inf], thresholds.astype(np.float64)])


def auroc(scores: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[bool]) -> float:
    """Exact area under the ROC curve; equals ``sklearn.metrics.roc_auc_score``, ties included."""
    return RankedScores.from_arrays(scores, labels).auroc()


def pr_curve(scores: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[bool]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(precision, recall, thresholds)`` at every distinct score, in decreasing threshold order."""
    ranked = RankedScores.from_arrays(scores, labels)
    ranked._require(True, False, "the PR curve")
    thresholds, tp, fp = ranked.curve()
    return tp / (tp + fp), tp / ranked.n_pos, thresholds.astype(np.float64)


def auprc(scores: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[bool]) -> float:
    """Average precision, exactly as ``sklearn.metrics.average_precision_score`` (no interpolation)."""
    return RankedScores.from_arrays(scores, labels).auprc()


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice overlap ``2|P & G| / (|P| + |G|)`` of two boolean masks; two empty masks give 1.0."""
    p = np.asarray(pred, dtype=bool)
    g = np.asarray(gt, dtype=bool)
    if p.shape != g.shape:
        raise ValueError(f"dice: prediction shape {p.shape} differs from ground truth shape {g.shape}")
    denominator = int(np.count_nonzero(p)) + int(np.count_nonzero(g))
    if denominator == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(p & g)) / denominator


def dice_curve(scores: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[bool]
               ) -> tuple[np.ndarray, np.ndarray]:
    """``(thresholds, dice)`` of the pooled rule ``score >= t`` at every distinct score, decreasing."""
    ranked = RankedScores.from_arrays(scores, labels)
    thresholds, tp, fp = ranked.curve()
    return thresholds.astype(np.float64), 2.0 * tp / (tp + fp + ranked.n_pos)


def best_dice(scores: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[bool]) -> tuple[float, float]:
    """``(dice, threshold)``: the exact best pooled Dice over all distinct scores (highest threshold on ties)."""
    return RankedScores.from_arrays(scores, labels).best_dice()


@dataclass(frozen=True)
class LesionStats:
    """Per-lesion detection counts; add instances to pool them over scans."""

    n_lesions: int
    n_detected: int
    sensitivity: float | None
    """``n_detected / n_lesions``; ``None`` when there are no lesions."""
    n_false_positive_components: int

    def __add__(self, other: LesionStats) -> LesionStats:
        n = self.n_lesions + other.n_lesions
        d = self.n_detected + other.n_detected
        return LesionStats(n, d, d / n if n else None,
                           self.n_false_positive_components + other.n_false_positive_components)

    def to_dict(self) -> dict[str, float | int | None]:
        """Plain dictionary of the four fields."""
        return asdict(self)


def lesion_detection(pred_mask: np.ndarray, gt_mask: np.ndarray, *, connectivity: int = 3) -> LesionStats:
    """Count ground-truth lesions hit by any predicted voxel and predicted components touching no lesion.

    ``connectivity`` is that of ``scipy.ndimage.generate_binary_structure``: 1 = faces (6-neighbours in
    3D), 2 = faces and edges (18), 3 = also corners (26, the default, as in :mod:`anomaly.findings`).
    """
    pred = np.asarray(pred_mask, dtype=bool)
    gt = np.asarray(gt_mask, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"lesion_detection: prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    if not 1 <= connectivity <= pred.ndim:
        raise ValueError(f"lesion_detection: connectivity {connectivity} must lie in 1..{pred.ndim}")
    structure = ndimage.generate_binary_structure(pred.ndim, connectivity)
    gt_labels, n_lesions = ndimage.label(gt, structure=structure)
    pred_labels, n_pred = ndimage.label(pred, structure=structure)
    overlap = pred & gt
    n_detected = int(np.unique(gt_labels[overlap]).size)
    n_touching = int(np.unique(pred_labels[overlap]).size)
    return LesionStats(
        n_lesions=int(n_lesions),
        n_detected=n_detected,
        sensitivity=n_detected / n_lesions if n_lesions else None,
        n_false_positive_components=int(n_pred) - n_touching,
    )


def scan_auroc(scan_scores: Sequence[float] | np.ndarray, scan_labels: Sequence[bool] | np.ndarray) -> float:
    """AUROC of scan-level scores against scan-level labels (abnormal = True)."""
    values = _as_scores(scan_scores, "scan scores")
    truth = _as_labels(scan_labels, values.size, "scan labels")
    ranked = RankedScores(values[truth], values[~truth])
    if ranked.n_pos == 0 or ranked.n_neg == 0:
        raise ValueError(f"scan AUROC is undefined: {ranked.n_pos} abnormal and {ranked.n_neg} normal scans; "
                         "evaluate on a set holding both")
    return ranked.auroc()

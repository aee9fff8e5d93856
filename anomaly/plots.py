"""Evaluation figures (ROC, precision-recall, Dice against threshold, scan-score histogram) as
matplotlib Figures, drawn without pyplot so no global backend or figure registry is touched.

matplotlib is imported only when a figure is made (it is an optional dependency).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from anomaly.fileio import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MAX_POINTS = 4000
"""Curves longer than this are thinned for drawing (every point is kept in the metrics themselves)."""


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Axes]:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: `pip install matplotlib` (or the `eval` extra)") from exc
    fig = Figure(figsize=(5.0, 4.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _thin(*arrays: np.ndarray, max_points: int = MAX_POINTS) -> list[np.ndarray]:
    """Evenly spaced subsample of parallel arrays, first and last points kept."""
    arrays_ = [np.asarray(a, dtype=np.float64) for a in arrays]
    n = arrays_[0].size
    if n <= max_points:
        return arrays_
    index = np.unique(np.linspace(0, n - 1, max_points).round().astype(np.int64))
    return [a[index] for a in arrays_]


def plot_roc(fpr: np.ndarray, tpr: np.ndarray, *, auc: float | None = None, label: str | None = None,
             operating_point: tuple[float, float] | None = None, title: str = "ROC curve") -> Figure:
    """ROC curve from :func:`anomaly.metrics.roc_curve`, with the chance diagonal and an optional
    ``(fpr, tpr)`` operating point."""
    fig, ax = _figure(title, "false-positive rate", "true-positive rate")
    x, y = _thin(fpr, tpr)
    name = label or "model"
    ax.plot(x, y, lw=1.8, label=f"{name} (AUROC {auc:.3f})" if auc is not None else name)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    if operating_point is not None:
        ax.plot(*operating_point, "o", color="crimson", label="operating point")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right")
    return fig


def plot_pr(precision: np.ndarray, recall: np.ndarray, *, ap: float | None = None, prevalence: float | None = None,
            label: str | None = None, title: str = "Precision-recall curve") -> Figure:
    """Precision-recall curve from :func:`anomaly.metrics.pr_curve`; ``prevalence`` draws the chance level."""
    fig, ax = _figure(title, "recall (sensitivity)", "precision")
    r, p = _thin(recall, precision)
    name = label or "model"
    ax.step(r, p, where="post", lw=1.8, label=f"{name} (AP {ap:.3f})" if ap is not None else name)
    if prevalence is not None:
        ax.axhline(prevalence, ls="--", color="grey", lw=1, label=f"chance ({prevalence:.3g})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(loc="upper right")
    return fig


def plot_dice_curve(thresholds: np.ndarray, dice: np.ndarray, *, best: tuple[float, float] | None = None,
                    threshold: float | None = None, title: str = "Dice against threshold") -> Figure:
    """Pooled Dice against threshold (:func:`anomaly.metrics.dice_curve`); ``best`` is ``(dice, threshold)``
    and ``threshold`` a calibrated threshold to mark."""
    fig, ax = _figure(title, "threshold (score >= t is anomalous)", "Dice")
    order = np.argsort(np.asarray(thresholds), kind="stable")
    t, d = _thin(np.asarray(thresholds)[order], np.asarray(dice)[order])
    ax.plot(t, d, lw=1.8, label="pooled Dice")
    if best is not None:
        ax.plot(best[1], best[0], "o", color="crimson", label=f"best {best[0]:.3f} at {best[1]:.4g}")
    if threshold is not None:
        ax.axvline(threshold, ls="--", color="black", lw=1, label=f"threshold {threshold:.4g}")
    ax.set_ylim(0, 1.01)
    ax.legend(loc="best")
    return fig


def plot_score_histogram(scan_scores: Sequence[float] | np.ndarray, threshold: float | None = None,
                         labels: Sequence[bool] | np.ndarray | None = None, *, bins: int = 30,
                         title: str = "Scan scores") -> Figure:
    """Histogram of scan scores, split into normal and abnormal when ``labels`` are given."""
    scores = np.asarray(scan_scores, dtype=np.float64).reshape(-1)
    fig, ax = _figure(title, "scan score", "scans")
    edges = np.histogram_bin_edges(scores, bins=bins).tolist() if scores.size else bins
    if labels is None:
        ax.hist(scores, bins=edges, color="steelblue", alpha=0.8, label="scans")
    else:
        truth = np.asarray(labels, dtype=bool).reshape(-1)
        if truth.size != scores.size:
            raise ValueError(f"plot_score_histogram: {truth.size} labels for {scores.size} scores")
        ax.hist(scores[~truth], bins=edges, color="steelblue", alpha=0.6, label=f"normal ({int((~truth).sum())})")
        ax.hist(scores[truth], bins=edges, color="darkorange", alpha=0.6, label=f"abnormal ({int(truth.sum())})")
    if threshold is not None:
        ax.axvline(threshold, ls="--", color="black", lw=1.2, label=f"threshold {threshold:.4g}")
    ax.legend(loc="best")
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str], *, dpi: int = 120) -> Path:
    """Write a figure as PNG atomically (temporary file in the same folder, then rename)."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)

"""Voxel scores pooled over many scans in bounded memory: exact below a cap, binned above it.

Maps are read one at a time. A :class:`ValuePool` keeps each scan's lesion and non-lesion brain values
while their total stays at or under ``cap`` (then the pooled metrics are exact,
:class:`anomaly.metrics.RankedScores`); past the cap it drops them and keeps only counts and the range, and a
second pass over the maps fills :class:`BinnedScores`: ``bins`` equal-width bins over the pooled
[min, max] per class, plus exact counts at thresholds known beforehand (``marks``). Memory then holds
``2 * bins`` counters however many scans there are.

Binned figures take the bins' lower edges as thresholds, so they are the exact curve sampled at the edges:
counts at an edge are exact, a threshold found on them (best Dice, a sensitivity or false-positive
target) is an edge within one bin width of the exact one, and AUROC/AUPRC count the values inside one
bin as tied (the AUROC error is at most :meth:`BinnedScores.auroc_max_error`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from anomaly.metrics import CHUNK, CurveMetrics, RankedScores, cast_thresholds

DEFAULT_CAP = 50_000_000
"""Pooled values (about 200 MB of float32) up to which the pooled metrics are exact."""
DEFAULT_BINS = 1 << 16
"""Equal-width bins per class above the cap."""


def _finite_range(values: np.ndarray, what: str) -> tuple[float, float]:
    lo, hi = float(values.min()), float(values.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{what} scores hold NaN or infinite values; clean the maps first")
    return lo, hi


class ValuePool:
    """Per-scan value pieces kept while their total is at most ``cap``; beyond it, counts and range only."""

    def __init__(self, cap: int = DEFAULT_CAP) -> None:
        self.cap = int(cap)
        self.positives: list[np.ndarray] = []
        self.negatives: list[np.ndarray] = []
        self.n_pos = self.n_neg = 0
        self.lo, self.hi = math.inf, -math.inf
        self.exact = True
        self.peak_held = 0
        """Most values held at once (never above ``cap``): the measure that memory stays bounded."""

    @property
    def held(self) -> int:
        """Values held now."""
        return sum(p.size for p in self.positives) + sum(n.size for n in self.negatives)

    def add(self, positives: np.ndarray, negatives: np.ndarray) -> None:
        """One scan's lesion (``positives``) and non-lesion (``negatives``) brain values."""
        for part, what in ((positives, "lesion"), (negatives, "non-lesion")):
            if part.size:
                lo, hi = _finite_range(part, what)
                self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self.n_pos += int(positives.size)
        self.n_neg += int(negatives.size)
        if self.exact and self.n_pos + self.n_neg <= self.cap:
            self.positives.append(positives)
            self.negatives.append(negatives)
            self.peak_held = max(self.peak_held, self.n_pos + self.n_neg)
        elif self.exact:
            self.exact = False
            self.positives, self.negatives = [], []

    def facts(self) -> dict[str, Any]:
        """How the pool went: exact or binned, the values seen, the cap and the most held at once."""
        return {"method": "exact" if self.exact else "binned", "n_values": self.n_pos + self.n_neg,
                "exact_cap": self.cap, "peak_values_held": self.peak_held}

    def ranked(self) -> RankedScores:
        """The exact pooled scores (one sorted copy; the pieces are released)."""
        if not self.exact:
            raise ValueError("the pool passed its cap and holds no values; fill BinnedScores in a second pass")
        ranked = RankedScores.from_parts(self.positives, self.negatives)
        self.positives, self.negatives = [], []
        return ranked


def bin_edges(lo: float, hi: float, bins: int) -> np.ndarray:
    """``bins + 1`` equal-width edges over ``[lo, hi]`` (widened to 1 when the range is a single value)."""
    if not hi > lo:
        hi = lo + 1.0
    return np.linspace(lo, hi, int(bins) + 1)


def histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per bin (``edges[j] <= v < edges[j + 1]``, the last bin closed), exact at the edges in float64."""
    return np.histogram(values, bins=edges.size - 1, range=(float(edges[0]), float(edges[-1])))[0].astype(np.int64)


def suffix(counts: np.ndarray) -> np.ndarray:
    """Values at or above each bin's lower edge."""
    return np.cumsum(counts[::-1])[::-1]


def edge_threshold(edges: np.ndarray, counts: np.ndarray, allowed: int) -> tuple[float, int]:
    """Lower edge of the lowest non-empty bin with at most ``allowed`` values at or above it, and that count;
    the next float above the top edge when every bin holds more (as the exact rule above a tied maximum)."""
    above = suffix(counts)
    ok = np.flatnonzero((above <= allowed) & (counts > 0))
    if ok.size:
        j = int(ok[0])
        return float(edges[j]), int(above[j])
    return float(np.nextafter(edges[-1], np.inf)), 0


class BinnedScores(CurveMetrics):
    """Lesion and non-lesion values counted in equal-width bins, with exact counts at ``marks``."""

    def __init__(self, lo: float, hi: float, bins: int = DEFAULT_BINS, marks: Sequence[float] = ()) -> None:
        self.edges = bin_edges(lo, hi, bins)
        self.pos_counts = np.zeros(int(bins), dtype=np.int64)
        self.neg_counts = np.zeros(int(bins), dtype=np.int64)
        self.marks = {float(t): [0, 0] for t in marks}

    def add(self, positives: np.ndarray, negatives: np.ndarray) -> None:
        """Count one scan's lesion and non-lesion values."""
        self.pos_counts += histogram(positives, self.edges)
        self.neg_counts += histogram(negatives, self.edges)
        for t, counts in self.marks.items():
            for i, part in enumerate((positives, negatives)):
                if part.size:
                    counts[i] += int(np.count_nonzero(part >= cast_thresholds(np.asarray(t), part.dtype)))

    @property
    def bin_width(self) -> float:
        """Width of one bin, the resolution of every binned threshold."""
        return float(self.edges[1] - self.edges[0])

    @property
    def n_pos(self) -> int:
        return int(self.pos_counts.sum())

    @property
    def n_neg(self) -> int:
        return int(self.neg_counts.sum())

    def counts_at(self, thresholds: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Exact counts at a mark or an edge; elsewhere those at the lowest edge at or above the threshold."""
        t = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
        j = np.searchsorted(self.edges[:-1], t, side="left")
        tp = np.append(suffix(self.pos_counts), 0)[j]
        fp = np.append(suffix(self.neg_counts), 0)[j]
        for i, value in enumerate(t):
            if float(value) in self.marks:
                tp[i], fp[i] = self.marks[float(value)]
        return tp.astype(np.int64), fp.astype(np.int64)

    def curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(thresholds, tp, fp)`` at the lower edges of the non-empty bins, decreasing thresholds."""
        keep = np.flatnonzero((self.pos_counts + self.neg_counts) > 0)[::-1]
        return self.edges[keep], suffix(self.pos_counts)[keep], suffix(self.neg_counts)[keep]

    def chunks(self, chunk: int = CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        yield self.curve()

    def threshold_for_sensitivity(self, sensitivity: float) -> float:
        """Highest edge whose sensitivity is at least ``sensitivity`` (within one bin below the exact one)."""
        self._require(True, False, "a sensitivity operating point")
        if not 0.0 < sensitivity <= 1.0:
            raise ValueError(f"sensitivity {sensitivity!r} must lie in (0, 1]")
        needed = math.ceil(sensitivity * self.n_pos - 1e-9 * self.n_pos)
        return float(self.edges[int(np.flatnonzero(suffix(self.pos_counts) >= needed)[-1])])

    def auroc_max_error(self) -> float:
        """Largest possible difference between the binned and the exact AUROC: half the share of
        (lesion, non-lesion) pairs that fall in the same bin, whose order the bins cannot tell."""
        if not (self.n_pos and self.n_neg):
            return math.nan
        same = float(np.dot(self.pos_counts.astype(np.float64), self.neg_counts.astype(np.float64)))
        return 0.5 * same / (float(self.n_pos) * float(self.n_neg))


def pooled_scores(pool: ValuePool, again: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]], *,
                  bins: int = DEFAULT_BINS, marks: Sequence[float] = ()) -> CurveMetrics:
    """The pool's exact scores, or, past its cap, :class:`BinnedScores` filled from ``again()`` (a second
    pass yielding the same per-scan ``(positives, negatives)``)."""
    if pool.exact:
        return pool.ranked()
    binned = BinnedScores(pool.lo, pool.hi, bins, marks)
    for positives, negatives in again():
        binned.add(positives, negatives)
    if (binned.n_pos, binned.n_neg) != (pool.n_pos, pool.n_neg):
        raise ValueError("the maps changed between the two passes over them; run again when nothing writes them")
    return binned


def pooling_facts(scores: CurveMetrics, pool: ValuePool) -> dict[str, Any]:
    """How the pooled figures were computed (exact or binned, the bin width), for summaries and metrics."""
    facts = pool.facts()
    if isinstance(scores, BinnedScores):
        facts.update(bins=int(scores.pos_counts.size), bin_width=scores.bin_width,
                     range=[float(scores.edges[0]), float(scores.edges[-1])],
                     auroc_max_error=None if math.isnan(err := scores.auroc_max_error()) else err,
                     note=f"more than {pool.cap:,} pooled values: pooled figures from {scores.pos_counts.size:,} "
                          f"bins of width {scores.bin_width:.3g}; thresholds are bin edges (within one bin width "
                          "of the exact ones), AUROC/AUPRC count values in one bin as tied")
    return facts


class TailHistograms:
    """Pooled counts at or above a floor in fine bins, and the same for ``n_draws`` bootstrap draws of the
    scans (with replacement, drawn as they stream by) in coarser bins: memory fixed by the bins and draws.

    Scan ``s`` of ``n`` gets weight ``Binomial(remaining, 1 / (n - s))`` in each draw, which makes every
    draw's weights exactly multinomial (``n`` scans drawn uniformly with replacement).
    """

    def __init__(self, floor: float, hi: float, n_scans: int, *, bins: int = DEFAULT_BINS, n_draws: int = 0,
                 draw_bins: int = 4096, rng: np.random.Generator | None = None) -> None:
        self.edges = bin_edges(floor, hi, bins)
        self.counts = np.zeros(int(bins), dtype=np.int64)
        self.group = max(1, int(bins) // int(draw_bins)) if int(bins) % int(draw_bins) == 0 else 1
        self.draw_edges = self.edges[:: self.group]
        self.draw_counts = np.zeros((int(n_draws), self.counts.size // self.group), dtype=np.int64)
        self.draw_sizes = np.zeros(int(n_draws), dtype=np.int64)
        self._remaining = np.full(int(n_draws), int(n_scans), dtype=np.int64)
        self._n_scans, self._seen = int(n_scans), 0
        self._rng = rng if rng is not None else np.random.default_rng(0)

    def add(self, values: np.ndarray) -> None:
        """One scan's values (all of them: the scan's size weighs in every draw's voxel count)."""
        if self._seen >= self._n_scans:
            raise ValueError(f"more than the {self._n_scans} scans announced; count the scans again")
        counts = histogram(values[values >= self.edges[0]], self.edges)
        self.counts += counts
        if self.draw_counts.shape[0]:
            weights = self._rng.binomial(self._remaining, 1.0 / (self._n_scans - self._seen))
            self._remaining -= weights
            drawn = np.flatnonzero(weights)
            coarse = counts.reshape(-1, self.group).sum(axis=1)
            for start in range(0, drawn.size, 64):  # in blocks: the temporary stays small
                rows = drawn[start : start + 64]
                self.draw_counts[rows] += weights[rows, None] * coarse[None, :]
            self.draw_sizes += weights * int(values.size)
        self._seen += 1

    @property
    def held(self) -> int:
        """Counters held (fixed at construction)."""
        return int(self.counts.size + self.draw_counts.size + self.draw_sizes.size)

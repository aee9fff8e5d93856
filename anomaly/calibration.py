"""Thresholds as first-class objects: calibrated on healthy scans (target false-positive rate) or on
labelled scans (best pooled Dice), with bootstrap confidence intervals, stored with the model, and
applied by the :class:`Calibration` itself (mask, flag, findings) wherever a threshold is used.

Threshold rule everywhere: a voxel (or scan) is positive when its score is ``>= threshold``
(:func:`at_or_above`, exact for float32 maps).

Healthy calibration, voxel level: with the ``N`` brain voxels of all healthy scans pooled and
``k = floor(target_fpr * N)`` exceedances allowed, the threshold is the smallest pooled value ``t``
with ``#{v >= t} <= k``; when even the maximum is tied more than ``k`` times it is the next float
above the maximum. The achieved rate ``#{v >= t} / N`` is therefore never above the target and falls
short of it by less than the share of voxels tied at the value just below ``t`` (``1 / N`` without ties). The scan threshold follows the same rule on the healthy scan scores.

Refusals (:class:`CalibrationError`): ``target_fpr`` outside (0, 0.5]; fewer than
``MIN_VOXEL_EXCEEDANCES`` expected false-positive voxels (``N * target_fpr``); a scan-level target with
``n_scans * scan_target_fpr < 1`` (no healthy scan would be allowed above the threshold, so the rate
is not estimable); a bootstrap asked for on fewer than ``MIN_BOOTSTRAP_SCANS`` scans.

Bootstrap: scans are drawn with replacement ``n_bootstrap`` times; each draw recomputes both
thresholds on its pooled voxels and scores by the rule above; the 95 % interval is the 2.5 and 97.5
percentiles of the draws. Only the voxels at or above the lowest per-scan upper quantile can decide
any draw's threshold (proved in :func:`_tail_floor`), so each draw costs a pass over that tail only.

Memory: maps are read one at a time. Up to ``exact_cap`` pooled brain voxels (default 50 million) they
are held and everything above is exact. Past it they are read a second time into fixed-size histograms
(:mod:`anomaly.pooled`): the healthy threshold becomes the lower edge of the lowest non-empty bin over
the tail (from the floor up) with at most ``k`` values at or above it, so the achieved rate still never
exceeds the target and the threshold lies within one bin width of the exact one; the bootstrap draws
are drawn as the scans stream by (exactly multinomial weights) into bins 16 times wider. The labelled
calibration takes its Dice, operating points and AUROC/AUPRC from :class:`anomaly.pooled.BinnedScores`.
The metrics' ``pooling`` entry says which way they were computed, and the bin width.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from anomaly.atlas import Atlas
from anomaly.configparse import ConfigError, build
from anomaly.findings import Finding, drop_small_components, extract_findings
from anomaly.jsonio import read_json, to_jsonable, write_json
from anomaly.metrics import RankedScores, auroc, cast_thresholds
from anomaly.pooled import (
    DEFAULT_BINS,
    DEFAULT_CAP,
    TailHistograms,
    ValuePool,
    edge_threshold,
    pooled_scores,
    pooling_facts,
)
from anomaly.records import DEFAULT_MIN_VOLUME_ML, AppliedCalibrationNote, CalibrationData

METHODS = ("healthy-fpr", "labelled-dice", "manual")
MIN_VOXEL_EXCEEDANCES = 100
MIN_BOOTSTRAP_SCANS = 2
DEFAULT_SENSITIVITIES = (0.5, 0.8, 0.9, 0.95)
_NO_VALUES = np.empty(0, dtype=np.float32)
MAP_NEUTRAL_SETTINGS = frozenset({"batch_size", "save_reconstruction"})
"""Scoring settings that change speed or extra outputs, never the anomaly map a threshold applies to."""


class CalibrationError(ValueError):
    """A calibration that cannot be done with the data given; the message says what to change."""


def at_or_above(values: np.ndarray | float, threshold: float) -> np.ndarray:
    """The threshold rule, and the only place a score is compared with a calibrated threshold:
    ``values >= threshold``, exact for float32 maps too (the threshold is never rounded down to float32,
    so a float32 voxel of 0.7 is below a threshold of 0.7, as the true numbers are)."""
    scores = np.asarray(values)
    if scores.dtype.kind != "f":
        scores = scores.astype(np.float64)
    return np.asarray(scores >= cast_thresholds(np.asarray(threshold, dtype=np.float64), scores.dtype))


class StoredCalibration(Protocol):
    """What :meth:`Calibration.from_stored` reads from a stored calibration (the ORM row)."""

    name: str
    version: int
    method: str
    voxel_threshold: float
    scan_threshold: float | None
    target_fpr: float | None
    settings_hash: str | None
    data: dict[str, Any]
    metrics: dict[str, Any]


@dataclass(frozen=True)
class Applied:
    """A calibration applied to one scan: the findings mask (thresholded inside the brain), the scan
    flag (None without a scan threshold) and the findings (components of at least ``min_volume_ml``)."""

    mask: np.ndarray
    flagged: bool | None
    findings: list[Finding]


@dataclass(frozen=True)
class Calibration:
    """Calibrated thresholds and what they apply to, as one object that applies itself.

    ``voxel_threshold`` makes the findings mask, ``scan_threshold`` flags scans, ``min_volume_ml`` is the
    smallest finding; ``settings_hash``/``settings`` fingerprint the scoring settings the calibration's
    maps were made with (its thresholds hold only for maps made the same way); ``ref`` is
    ``name@version`` once stored. Scoring, evaluation and the dashboard all apply thresholds through
    :meth:`voxel_mask`, :meth:`flag` and :meth:`apply`, so a mask written by ``score`` is the mask
    ``evaluate`` measures.
    """

    method: str
    voxel_threshold: float
    scan_threshold: float | None = None
    target_fpr: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    min_volume_ml: float = DEFAULT_MIN_VOLUME_ML
    settings_hash: str | None = None
    settings: dict[str, Any] | None = None
    ref: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CalibrationError(f"calibration method {self.method!r} is unknown; use one of {METHODS}")
        if not math.isfinite(float(self.voxel_threshold)):
            raise CalibrationError(f"voxel threshold {self.voxel_threshold!r} is not a finite number")
        if not (math.isfinite(float(self.min_volume_ml)) and self.min_volume_ml >= 0):
            raise CalibrationError(f"min_volume_ml {self.min_volume_ml!r} must be a number >= 0 (mL)")

    # ------------------------------------------------------------------------------------ applying

    def voxel_mask(self, score_map: np.ndarray, brain_mask: np.ndarray | None = None) -> np.ndarray:
        """Boolean findings mask: :func:`at_or_above` the voxel threshold, inside ``brain_mask`` (whole
        volume when None)."""
        out = at_or_above(score_map, self.voxel_threshold)
        if brain_mask is not None:
            mask = np.asarray(brain_mask, dtype=bool)
            if mask.shape != out.shape:
                raise ValueError(f"brain mask shape {mask.shape} differs from map shape {out.shape}")
            out &= mask
        return out

    def flag(self, score: float | None) -> bool | None:
        """Whether a scan score is at or above the scan threshold (None without one, or without a finite score)."""
        if self.scan_threshold is None or score is None or not math.isfinite(float(score)):
            return None
        return bool(at_or_above(float(score), self.scan_threshold))

    def lesion_mask(self, mask: np.ndarray, voxel_ml: float) -> np.ndarray:
        """``mask`` without components smaller than ``min_volume_ml`` (what counts as findings)."""
        return drop_small_components(mask, voxel_ml, self.min_volume_ml)

    def apply(self, score_map: np.ndarray, brain_mask: np.ndarray | None, affine: np.ndarray, *,
              score: float | None = None, atlas: Atlas | None = None, in_mni: bool = False,
              to_atlas: Callable[[np.ndarray], np.ndarray] | None = None) -> Applied:
        """Mask, flag and findings of one scan (see :func:`anomaly.findings.extract_findings` for the atlas)."""
        mask = self.voxel_mask(score_map, brain_mask)
        findings = extract_findings(score_map, mask, affine, min_volume_ml=self.min_volume_ml, atlas=atlas,
                                    in_mni=in_mni, to_atlas=to_atlas)
        return Applied(mask=mask, flagged=self.flag(score), findings=findings)

    def note(self, in_mni: bool = False) -> AppliedCalibrationNote:
        """What a result records about the calibration it was scored with."""
        return AppliedCalibrationNote(name=self.ref or self.method, voxel_threshold=self.voxel_threshold,
                                      scan_threshold=self.scan_threshold, min_volume_ml=self.min_volume_ml,
                                      in_mni=in_mni)

    # ------------------------------------------------------------------------------- fitting a run

    def settings_problem(self, settings_hash: str, settings: dict[str, Any] | None = None) -> str | None:
        """Why these thresholds do not hold for maps made with ``settings`` (None when they do).

        When the calibration knows its settings, those that change maps are compared one by one
        (``MAP_NEUTRAL_SETTINGS`` are not; a setting added since counts as its default) and the
        differing ones named; otherwise the settings hashes are compared.
        """
        from anomaly.config import ScoringSettings

        detail = ""
        if self.settings is not None and settings is not None:
            old, new = {**_flat(ScoringSettings().to_dict()), **_flat(self.settings)}, _flat(settings)
            changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                       if k not in MAP_NEUTRAL_SETTINGS and old.get(k) != new.get(k)]
            if not changed:
                return None
            detail = f" ({'; '.join(changed)})"
        elif not self.settings_hash or self.settings_hash == settings_hash:
            return None
        return (f"calibration {self.ref or self.method} was made on maps scored with other settings (settings "
                f"hash {self.settings_hash}, here {settings_hash}){detail}; its thresholds do not hold for these "
                "maps: score with the same --config/--precision as the calibration, or calibrate again with "
                "these settings (--force-calibration applies it anyway)")

    # ---------------------------------------------------------------------------------- storage

    @classmethod
    def from_stored(cls, row: StoredCalibration) -> Calibration:
        """The calibration a stored row holds (thresholds from its columns, the rest from its data)."""
        data = CalibrationData.from_dict(row.data)
        return cls(method=row.method, voxel_threshold=float(row.voxel_threshold),
                   scan_threshold=None if row.scan_threshold is None else float(row.scan_threshold),
                   target_fpr=None if row.target_fpr is None else float(row.target_fpr),
                   metrics=dict(row.metrics or {}), min_volume_ml=data.min_volume_ml,
                   settings_hash=row.settings_hash, settings=data.settings, ref=f"{row.name}@{row.version}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (non-finite numbers become ``None``)."""
        return to_jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        """Inverse of :meth:`to_dict`; names the missing key when the dictionary is incomplete."""
        missing = [key for key in ("method", "voxel_threshold") if key not in data]
        if missing:
            raise CalibrationError(f"calibration dictionary lacks {missing}; it was not written by to_dict()")
        try:
            return build(cls, data, lenient=True)
        except ConfigError as exc:
            raise CalibrationError(f"calibration dictionary: {exc}") from exc

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as JSON atomically (temporary file, then rename)."""
        return write_json(path, self)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Calibration:
        """Read a JSON file written by :meth:`save`."""
        try:
            data = read_json(path, "calibration file")
        except ValueError as exc:
            raise CalibrationError(f"{exc}; run the calibration again to write it") from exc
        if not isinstance(data, dict):
            raise CalibrationError(f"{path}: not a calibration file; run the calibration again to write it")
        return cls.from_dict(data)


def _flat(values: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(values, dict):
        return {prefix.rstrip("."): values}
    out: dict[str, Any] = {}
    for key, value in values.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def _check_rate(rate: float, what: str) -> float:
    if not isinstance(rate, (int, float, np.floating)) or not 0.0 < float(rate) <= 0.5:
        raise CalibrationError(f"{what} = {rate!r} must lie in (0, 0.5]; e.g. 0.01 for one false-positive "
                               "voxel in a hundred")
    return float(rate)


def _allowed(rate: float, n: int) -> int:
    """``floor(rate * n)`` robust to the binary rounding of ``rate`` (0.07 * 100 is 7, not 7.000000000000001)."""
    return int(math.floor(rate * n * (1.0 + 1e-12)))


def _iter_brain_values(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]
                       ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(index, brain mask, brain voxel values)`` per scan, validated (shapes, non-empty, finite)."""
    if len(maps) != len(masks):
        raise CalibrationError(f"{len(maps)} maps but {len(masks)} brain masks; pass one mask per map")
    if not maps:
        raise CalibrationError("no scans given; calibration needs at least one scored scan")
    for i, (score_map, brain) in enumerate(zip(maps, masks, strict=True)):
        score_map = np.asarray(score_map)
        brain = np.asarray(brain, dtype=bool)
        if score_map.shape != brain.shape:
            raise CalibrationError(f"scan #{i}: map shape {score_map.shape} differs from brain mask shape "
                                   f"{brain.shape}; pass the mask on the map's grid")
        inside = score_map[brain]
        if inside.size == 0:
            raise CalibrationError(f"scan #{i}: the brain mask is empty; check the mask or leave the scan out")
        if inside.dtype.kind != "f" or inside.dtype.itemsize < 4:
            inside = inside.astype(np.float32)
        if not np.isfinite(inside).all():
            raise CalibrationError(f"scan #{i}: the map holds NaN or infinite values inside the brain; "
                                   "score the scan again or clean the map")
        yield i, brain, inside


def _kth_largest(values: np.ndarray, k: int) -> float:
    """The ``k``-th largest value (1-based), in linear time."""
    index = values.size - k
    return float(np.partition(values, index)[index])


def _tail_floor(values: list[np.ndarray], rate: float) -> float:
    """Lowest per-scan ``(floor(rate * n_s) + 1)``-th largest value.

    For any multiset of these scans (a bootstrap draw, or all of them), every scan has more than
    ``rate * n_s`` values at or above this floor, so the pooled count at or above it exceeds
    ``floor(rate * N)``: the ``(k + 1)``-th largest pooled value, which fixes the threshold, lies at or
    above the floor, and voxels below it can be dropped.
    """
    return min(_kth_largest(v, _allowed(rate, v.size) + 1) for v in values)


class _Tail:
    """Pooled values at or above the tail floor, sorted descending, with the scan each came from."""

    def __init__(self, values: list[np.ndarray], floor: float) -> None:
        parts = [v[v >= floor] for v in values]
        order_values = np.concatenate(parts)
        scan_ids = np.concatenate([np.full(p.size, i, dtype=np.int32) for i, p in enumerate(parts)])
        order = np.argsort(-order_values, kind="stable")
        self.values = order_values[order]
        self.scan_ids = scan_ids[order]
        self.sizes = np.array([v.size for v in values], dtype=np.int64)

    def threshold(self, weights: np.ndarray, rate: float) -> tuple[float, int, int]:
        """``(threshold, exceedances, n_voxels)`` for scans repeated ``weights`` times each."""
        n_total = int(np.dot(weights, self.sizes))
        k = _allowed(rate, n_total)
        per_voxel = weights[self.scan_ids]
        cumulative = np.cumsum(per_voxel)
        i = int(np.searchsorted(cumulative, k + 1, side="left"))  # the (k+1)-th largest value
        boundary = self.values[i]
        start = int(np.searchsorted(-self.values, -boundary, side="left"))  # first of its ties
        present = np.flatnonzero(per_voxel[:start] > 0)
        if present.size:
            j = int(present[-1])
            return float(self.values[j]), int(cumulative[j]), n_total
        return float(np.nextafter(self.values.dtype.type(boundary), self.values.dtype.type(np.inf))), 0, n_total


def _score_threshold(scores: np.ndarray, rate: float) -> tuple[float, int]:
    """Smallest score ``t`` with ``#{s >= t} <= floor(rate * n)`` (next float above the max if none)."""
    k = _allowed(rate, scores.size)
    ordered = np.sort(scores)[::-1]
    boundary = ordered[k] if k < ordered.size else -np.inf
    above = ordered[ordered > boundary]
    if above.size:
        return float(above[-1]), int(above.size)
    return float(np.nextafter(ordered[0], np.inf)), 0


def _percentile_ci(draws: np.ndarray) -> list[float]:
    return [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]


def _healthy_pass(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], rate: float, cap: int
                  ) -> tuple[ValuePool, float, int]:
    """First pass: the pooled brain values while they fit under ``cap``, the tail floor and the scan count."""
    pool = ValuePool(cap)
    floor, n_scans = math.inf, 0
    for _, _, inside in _iter_brain_values(maps, masks):
        floor = min(floor, _kth_largest(inside, _allowed(rate, inside.size) + 1))  # as _tail_floor, per scan
        pool.add(_NO_VALUES, inside)
        n_scans += 1
    return pool, floor, n_scans


def _check_healthy_data(n_voxels: int, n_scans: int, target_fpr: float, scan_target_fpr: float | None,
                        n_bootstrap: int) -> None:
    """The refusals of a healthy calibration (module docstring), each naming what to change."""
    if n_voxels * target_fpr < MIN_VOXEL_EXCEEDANCES:
        needed = math.ceil(MIN_VOXEL_EXCEEDANCES / target_fpr)
        raise CalibrationError(
            f"too few healthy brain voxels for target_fpr={target_fpr:g}: {n_voxels} voxels give "
            f"{n_voxels * target_fpr:.1f} expected false positives, at least {MIN_VOXEL_EXCEEDANCES} are needed "
            f"({needed} voxels); add healthy scans or raise target_fpr")
    if scan_target_fpr is not None and n_scans * scan_target_fpr < 1.0 - 1e-9:
        needed = math.ceil(1.0 / scan_target_fpr - 1e-9)
        raise CalibrationError(
            f"too few healthy scans for scan_target_fpr={scan_target_fpr:g}: {n_scans} scans, at least "
            f"{needed} are needed so that one healthy scan may lie above the threshold; add healthy scans "
            "or raise scan_target_fpr")
    if n_bootstrap and n_scans < MIN_BOOTSTRAP_SCANS:
        raise CalibrationError(
            f"a bootstrap needs at least {MIN_BOOTSTRAP_SCANS} healthy scans, {n_scans} given; add scans "
            "or pass n_bootstrap=0 to skip the confidence intervals")
    if n_bootstrap < 0:
        raise CalibrationError(f"n_bootstrap={n_bootstrap} must be 0 (no intervals) or positive")


def _exact_healthy(pool: ValuePool, floor: float, rate: float, scores: np.ndarray, scan_rate: float | None,
                   n_bootstrap: int, rng: np.random.Generator
                   ) -> tuple[float, int, np.ndarray, np.ndarray]:
    """Voxel threshold, its exceedances and the bootstrap draws (voxel, scan) from the pooled values."""
    n_scans = scores.size
    tail = _Tail(pool.negatives, floor)
    pool.negatives = []
    threshold, exceed, _ = tail.threshold(np.ones(n_scans, dtype=np.int64), rate)
    voxel_draws, scan_draws = np.empty(n_bootstrap), np.empty(n_bootstrap)
    for b in range(n_bootstrap):
        drawn = rng.integers(0, n_scans, n_scans)
        weights = np.bincount(drawn, minlength=n_scans).astype(np.int64)
        voxel_draws[b] = tail.threshold(weights, rate)[0]
        if scan_rate is not None:
            scan_draws[b] = _score_threshold(scores[drawn], scan_rate)[0]
    return threshold, exceed, voxel_draws, scan_draws


def _binned_healthy(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], pool: ValuePool, floor: float,
                    rate: float, scores: np.ndarray, scan_rate: float | None, n_bootstrap: int,
                    rng: np.random.Generator, bins: int) -> tuple[float, int, np.ndarray, np.ndarray, dict[str, Any]]:
    """As :func:`_exact_healthy` from a second pass into :class:`TailHistograms` (memory fixed by the bins and
    draws): thresholds are bin edges, the draws' in bins 16 times wider."""
    n_scans = scores.size
    hist = TailHistograms(floor, pool.hi, n_scans, bins=bins, n_draws=n_bootstrap, rng=rng)
    for _, _, inside in _iter_brain_values(maps, masks):
        hist.add(inside)
    threshold, exceed = edge_threshold(hist.edges, hist.counts, _allowed(rate, pool.n_neg))
    voxel_draws = np.array([edge_threshold(hist.draw_edges, hist.draw_counts[b], _allowed(rate, int(n)))[0]
                            for b, n in enumerate(hist.draw_sizes)])
    scan_draws = np.empty(n_bootstrap)
    if scan_rate is not None:
        for b in range(n_bootstrap):
            scan_draws[b] = _score_threshold(scores[rng.integers(0, n_scans, n_scans)], scan_rate)[0]
    width = float(hist.edges[1] - hist.edges[0])
    facts = {**pool.facts(), "bins": int(hist.counts.size), "bin_width": width, "range": [floor, float(hist.edges[-1])],
             "bootstrap_bin_width": float(hist.draw_edges[1] - hist.draw_edges[0]), "counters_held": hist.held,
             "note": f"more than {pool.cap:,} pooled values: the threshold is a bin edge of width {width:.3g} over "
                     "the tail (the achieved rate stays at or below the target), the bootstrap draws' edges "
                     f"{hist.group}x wider"}
    return threshold, exceed, voxel_draws, scan_draws, facts


def calibrate_healthy(
    maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    scan_scores: Sequence[float],
    target_fpr: float,
    scan_target_fpr: float | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    *,
    exact_cap: int = DEFAULT_CAP,
    bins: int = DEFAULT_BINS,
) -> Calibration:
    """Voxel (and optionally scan) thresholds whose false-positive rate on healthy scans is at most the target.

    ``maps``/``masks`` are the healthy anomaly maps and their brain masks (same shapes), ``scan_scores``
    one score per scan. See the module docstring for the exact threshold rule, refusals and bootstrap.
    Maps are read one at a time; past ``exact_cap`` pooled values they are read a second time into
    ``bins`` bins over the tail (:mod:`anomaly.pooled`), so memory does not grow with the number of scans.
    """
    target_fpr = _check_rate(target_fpr, "target_fpr")
    if scan_target_fpr is not None:
        scan_target_fpr = _check_rate(scan_target_fpr, "scan_target_fpr")
    pool, floor, n_scans = _healthy_pass(maps, masks, target_fpr, exact_cap)
    scores = np.asarray(scan_scores, dtype=np.float64).reshape(-1)
    if scores.size != n_scans:
        raise CalibrationError(f"{scores.size} scan scores for {n_scans} maps; pass one score per scan")
    if not np.isfinite(scores).all():
        raise CalibrationError("scan scores hold NaN or infinite values; score the scans again")
    n_voxels = pool.n_neg
    _check_healthy_data(n_voxels, n_scans, target_fpr, scan_target_fpr, n_bootstrap)

    rng = np.random.default_rng(seed)
    if pool.exact:
        facts = pool.facts()
        voxel_threshold, exceed, voxel_draws, scan_draws = _exact_healthy(
            pool, floor, target_fpr, scores, scan_target_fpr, n_bootstrap, rng)
    else:
        voxel_threshold, exceed, voxel_draws, scan_draws, facts = _binned_healthy(
            maps, masks, pool, floor, target_fpr, scores, scan_target_fpr, n_bootstrap, rng, bins)
    metrics: dict[str, Any] = {
        "n_scans": n_scans,
        "n_voxels": n_voxels,
        "target_fpr": target_fpr,
        "achieved_fpr": exceed / n_voxels,
        "n_false_positive_voxels": exceed,
        "threshold_rule": "smallest pooled brain value t with #(v >= t) <= floor(target_fpr * n_voxels)",
        "pooling": facts,
    }
    scan_threshold = None
    if scan_target_fpr is not None:
        scan_threshold, scan_exceed = _score_threshold(scores, scan_target_fpr)
        metrics.update(scan_target_fpr=scan_target_fpr, achieved_scan_fpr=scan_exceed / n_scans)
    if n_bootstrap:
        metrics.update(n_bootstrap=n_bootstrap, seed=seed, voxel_threshold_ci=_percentile_ci(voxel_draws),
                       voxel_threshold_bootstrap_std=float(voxel_draws.std()),
                       ci_method="95% percentile bootstrap over scans drawn with replacement")
        if scan_target_fpr is not None:
            metrics["scan_threshold_ci"] = _percentile_ci(scan_draws)
    return Calibration("healthy-fpr", voxel_threshold, scan_threshold, target_fpr, metrics)


def _labelled_pieces(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], labels: Sequence[np.ndarray]
                     ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Per scan: its lesion and non-lesion brain values and the lesion voxels outside the brain mask."""
    for i, brain, inside_values in _iter_brain_values(maps, masks):
        lesion = np.asarray(labels[i])
        lesion = lesion if lesion.dtype == bool else lesion != 0
        if lesion.shape != brain.shape:
            raise CalibrationError(f"scan #{i}: label shape {lesion.shape} differs from map shape {brain.shape}; "
                                   "pass the labels on the map's grid")
        inside = lesion[brain]
        yield inside_values[inside], inside_values[~inside], int(np.count_nonzero(lesion & ~brain))


def _youden_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Scan threshold maximising sensitivity + specificity - 1 (the highest on ties) and that value."""
    ranked = RankedScores(scores[labels], scores[~labels])
    thresholds, tp, fp = ranked.curve()
    youden = tp / ranked.n_pos - fp / ranked.n_neg
    i = int(np.argmax(youden))
    return float(thresholds[i]), float(youden[i])


def calibrate_labelled(
    maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    scan_scores: Sequence[float] | None = None,
    sensitivities: Sequence[float] = DEFAULT_SENSITIVITIES,
    *,
    exact_cap: int = DEFAULT_CAP,
    bins: int = DEFAULT_BINS,
) -> Calibration:
    """Voxel threshold with the best pooled Dice on labelled scans, plus fixed-sensitivity operating points.

    Voxels are pooled inside the brain masks (lesion voxels outside a mask are ignored and counted).
    With ``scan_scores``, a scan is abnormal when it holds a lesion voxel in its mask; the scan
    threshold maximises Youden's J when both kinds of scan are present, and is left out otherwise.
    Past ``exact_cap`` pooled values the maps are read again into binned scores (:mod:`anomaly.pooled`).
    """
    if len(labels) != len(maps):
        raise CalibrationError(f"{len(maps)} maps but {len(labels)} label maps; pass one label map per scan")
    pool = ValuePool(exact_cap)
    scan_truth = []
    outside = 0
    for positives, negatives, lesion_outside in _labelled_pieces(maps, masks, labels):
        pool.add(positives, negatives)
        outside += lesion_outside
        scan_truth.append(bool(positives.size))
    ranked = pooled_scores(pool, lambda: ((p, n) for p, n, _ in _labelled_pieces(maps, masks, labels)), bins=bins)
    if ranked.n_pos == 0:
        raise CalibrationError("the labelled set holds no lesion voxels inside the brain masks; labelled "
                               "calibration needs scans with lesion labels (use calibrate_healthy for healthy scans)")
    best, threshold = ranked.best_dice()
    metrics: dict[str, Any] = {
        "n_scans": len(maps),
        "n_voxels": ranked.n_pos + ranked.n_neg,
        "n_lesion_voxels": ranked.n_pos,
        "n_lesion_voxels_outside_mask": outside,
        "best_dice": best,
        "operating_point": ranked.operating_point(threshold),
        "operating_points": [
            {"target_sensitivity": float(s), **ranked.operating_point(ranked.threshold_for_sensitivity(s))}
            for s in sensitivities
        ],
    }
    if ranked.n_neg:
        metrics["voxel_auroc"] = ranked.auroc()
    metrics["voxel_auprc"] = ranked.auprc()
    metrics["pooling"] = pooling_facts(ranked, pool)
    scan_threshold = None
    if scan_scores is not None:
        scores = np.asarray(scan_scores, dtype=np.float64).reshape(-1)
        truth = np.asarray(scan_truth, dtype=bool)
        if scores.size != truth.size:
            raise CalibrationError(f"{scores.size} scan scores for {truth.size} maps; pass one score per scan")
        metrics["n_abnormal_scans"] = int(truth.sum())
        if truth.all() or not truth.any():
            metrics["scan_threshold_note"] = "scan threshold needs both abnormal and normal scans"
        else:
            scan_threshold, youden = _youden_threshold(scores, truth)
            metrics.update(scan_auroc=auroc(scores, truth), scan_youden_j=youden)
    return Calibration("labelled-dice", threshold, scan_threshold, None, metrics)

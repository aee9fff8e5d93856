"""Threshold calibration on synthetic healthy and lesioned volumes, checked against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest

from anomaly import calibration as C
from anomaly import metrics as M

SHAPE = (32, 32, 32)


def _ball(centre: tuple[float, float, float], radius: float, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2


def _healthy(n: int, seed: int = 0, decimals: int = 2) -> tuple[list[np.ndarray], list[np.ndarray], list[float]]:
    """Healthy maps: gamma noise (rounded, so values tie) with a per-scan gain, inside a ball mask."""
    rng = np.random.default_rng(seed)
    brain = _ball((15.5, 15.5, 15.5), 13)
    maps = [np.round(rng.gamma(2.0, 1.0, SHAPE) * rng.uniform(0.8, 1.2), decimals).astype(np.float32)
            for _ in range(n)]
    return maps, [brain] * n, [float(np.percentile(m[brain], 99)) for m in maps]


def _brute_threshold(values: np.ndarray, rate: float) -> float:
    """Smallest value t with #(v >= t) <= floor(rate * n), by counting at every distinct value."""
    allowed = math.floor(rate * values.size + 1e-9)
    ordered = np.sort(values)
    candidates = np.unique(values)
    counts = values.size - np.searchsorted(ordered, candidates, side="left")
    ok = candidates[counts <= allowed]
    return float(ok.min()) if ok.size else float(np.nextafter(values.max(), np.inf))


def test_healthy_voxel_threshold_meets_target_fpr() -> None:
    maps, masks, scores = _healthy(8)
    result = C.calibrate_healthy(maps, masks, scores, target_fpr=0.01, n_bootstrap=200)
    pooled = np.concatenate([m[b] for m, b in zip(maps, masks, strict=True)])
    exceed = np.count_nonzero(pooled >= result.voxel_threshold) / pooled.size
    assert exceed <= 0.01
    assert exceed > 0.01 - 0.002  # close: only ties at the threshold keep it below the target
    assert result.voxel_threshold == pytest.approx(_brute_threshold(pooled, 0.01))
    assert result.metrics["achieved_fpr"] == pytest.approx(exceed)
    assert result.metrics["n_voxels"] == pooled.size and result.metrics["n_scans"] == 8
    lo, hi = result.metrics["voxel_threshold_ci"]
    assert lo <= result.voxel_threshold <= hi and lo < hi
    assert result.method == "healthy-fpr" and result.scan_threshold is None


def test_bootstrap_draw_equals_recomputation_on_the_drawn_scans() -> None:
    maps, masks, _ = _healthy(5, seed=3, decimals=1)  # heavy ties
    values = [m[b] for m, b in zip(maps, masks, strict=True)]
    tail = C._Tail(values, C._tail_floor(values, 0.02))
    rng = np.random.default_rng(1)
    for _ in range(6):
        drawn = rng.integers(0, 5, 5)
        weights = np.bincount(drawn, minlength=5)
        expected = _brute_threshold(np.concatenate([values[i] for i in drawn]), 0.02)
        assert tail.threshold(weights, 0.02)[0] == pytest.approx(expected)


def test_scan_threshold_and_its_interval() -> None:
    maps, masks, scores = _healthy(20, seed=5)
    result = C.calibrate_healthy(maps, masks, scores, target_fpr=0.02, scan_target_fpr=0.1, n_bootstrap=300, seed=2)
    s = np.asarray(scores)
    assert result.scan_threshold == pytest.approx(_brute_threshold(s, 0.1))
    assert np.count_nonzero(s >= result.scan_threshold) == 2  # floor(0.1 * 20) healthy scans above
    lo, hi = result.metrics["scan_threshold_ci"]
    assert lo <= result.scan_threshold <= hi
    again = C.calibrate_healthy(maps, masks, scores, target_fpr=0.02, scan_target_fpr=0.1, n_bootstrap=300, seed=2)
    assert again.metrics == result.metrics  # seeded: reproducible


def test_tied_maximum_gives_a_threshold_above_every_value() -> None:
    maps, masks, scores = _healthy(3)
    clipped = [np.minimum(m, np.float32(2.0)) for m in maps]  # about 40 % of voxels tie at the maximum
    result = C.calibrate_healthy(clipped, masks, scores, target_fpr=0.05, n_bootstrap=0)
    assert result.voxel_threshold > 2.0
    assert result.metrics["achieved_fpr"] == 0.0


@pytest.mark.parametrize("rate", [0.0, -0.1, 0.6, 1.0])
def test_refuses_rates_outside_range(rate: float) -> None:
    maps, masks, scores = _healthy(2)
    with pytest.raises(C.CalibrationError, match=r"must lie in \(0, 0.5\]"):
        C.calibrate_healthy(maps, masks, scores, target_fpr=rate)
    with pytest.raises(C.CalibrationError, match="scan_target_fpr"):
        C.calibrate_healthy(maps, masks, scores, target_fpr=0.01, scan_target_fpr=rate)


def test_refuses_too_little_healthy_data() -> None:
    maps, masks, scores = _healthy(4)
    with pytest.raises(C.CalibrationError, match="too few healthy brain voxels.*add healthy scans"):
        C.calibrate_healthy(maps[:1], masks[:1], scores[:1], target_fpr=1e-5, n_bootstrap=0)
    with pytest.raises(C.CalibrationError, match="too few healthy scans.*at least 20"):
        C.calibrate_healthy(maps, masks, scores, target_fpr=0.01, scan_target_fpr=0.05)
    with pytest.raises(C.CalibrationError, match="at least 2 healthy scans.*n_bootstrap=0"):
        C.calibrate_healthy(maps[:1], masks[:1], scores[:1], target_fpr=0.05)
    single = C.calibrate_healthy(maps[:1], masks[:1], scores[:1], target_fpr=0.05, n_bootstrap=0)
    assert "voxel_threshold_ci" not in single.metrics
    with pytest.raises(C.CalibrationError, match="3 scan scores for 4 maps"):
        C.calibrate_healthy(maps, masks, scores[:3], target_fpr=0.01)
    with pytest.raises(C.CalibrationError, match="scan #1: map shape"):
        C.calibrate_healthy(maps, [masks[0], masks[1][:-1], masks[2], masks[3]], scores, target_fpr=0.01)
    bad = [m.copy() for m in maps]
    bad[2][16, 16, 16] = np.nan
    with pytest.raises(C.CalibrationError, match="scan #2.*NaN"):
        C.calibrate_healthy(bad, masks, scores, target_fpr=0.01)


def _lesioned(n: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    brain = _ball((15.5, 15.5, 15.5), 13)
    maps, labels = [], []
    for i in range(n):
        lesion = _ball((10 + i, 18, 14), 3 + i % 2) if i % 3 != 2 else np.zeros(SHAPE, bool)  # every third healthy
        score = rng.gamma(2.0, 1.0, SHAPE) + 4.0 * lesion * rng.uniform(0.5, 1.5, SHAPE)
        maps.append(np.round(score, 2).astype(np.float32))
        labels.append(lesion)
    return maps, [brain] * n, labels


def test_labelled_calibration_maximises_pooled_dice() -> None:
    maps, masks, labels = _lesioned(6)
    scan_scores = [float(np.percentile(m[b], 99.5)) for m, b in zip(maps, masks, strict=True)]
    result = C.calibrate_labelled(maps, masks, labels, scan_scores=scan_scores)
    scores = np.concatenate([m[b] for m, b in zip(maps, masks, strict=True)])
    truth = np.concatenate([lab[b] for lab, b in zip(labels, masks, strict=True)])
    brute = max(M.dice(scores >= t, truth) for t in np.unique(scores))
    assert result.metrics["best_dice"] == pytest.approx(brute, abs=1e-12)
    assert M.dice(scores >= result.voxel_threshold, truth) == pytest.approx(brute, abs=1e-12)
    assert result.method == "labelled-dice" and result.metrics["n_lesion_voxels"] == int(truth.sum())
    for point in result.metrics["operating_points"]:
        t = point["threshold"]
        sens = np.count_nonzero(scores[truth] >= t) / truth.sum()
        assert sens == pytest.approx(point["sensitivity"]) and sens >= point["target_sensitivity"]
        higher = np.unique(scores[scores > t])
        if higher.size:  # the next distinct score would fall short: t is the highest such threshold
            assert np.count_nonzero(scores[truth] >= higher[0]) / truth.sum() < point["target_sensitivity"]
        fp = np.count_nonzero(scores[~truth] >= t)
        assert point["fpr"] == pytest.approx(fp / (~truth).sum())
        assert point["dice"] == pytest.approx(M.dice(scores >= t, truth))
    assert [p["target_sensitivity"] for p in result.metrics["operating_points"]] == [0.5, 0.8, 0.9, 0.95]
    assert result.metrics["n_abnormal_scans"] == 4 and result.scan_threshold is not None
    assert result.metrics["voxel_auroc"] == pytest.approx(M.auroc(scores, truth))


def test_labelled_refuses_without_lesions_and_roundtrips(tmp_path) -> None:
    maps, masks, labels = _lesioned(3)
    with pytest.raises(C.CalibrationError, match="the labelled set holds no lesion voxels"):
        C.calibrate_labelled(maps, masks, [np.zeros(SHAPE, bool)] * 3)
    result = C.calibrate_labelled(maps, masks, labels)
    again = C.Calibration.from_dict(result.to_dict())
    assert again == result
    path = result.save(tmp_path / "cal" / "calibration.json")
    assert C.Calibration.load(path) == result
    with pytest.raises(C.CalibrationError, match="lacks"):
        C.Calibration.from_dict({"method": "healthy-fpr"})
    with pytest.raises(C.CalibrationError, match="unknown"):
        C.Calibration("otsu", 1.0)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(C.CalibrationError, match="broken.json"):
        C.Calibration.load(tmp_path / "broken.json")


def test_calibration_applies_its_thresholds() -> None:
    score = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    brain = np.ones((3, 3, 3), bool)
    brain[0] = False
    cal = C.Calibration("manual", 20.0, scan_threshold=5.0)
    mask = cal.voxel_mask(score, brain)
    assert mask.dtype == bool and mask.sum() == 7 and not mask[0].any()
    assert cal.voxel_mask(score).sum() == 7
    with pytest.raises(ValueError, match="shape"):
        cal.voxel_mask(score, brain[:2])
    value = np.array([0.3], dtype=np.float32)  # float32 0.3 is 0.30000001192...
    assert C.Calibration("manual", float(value[0])).voxel_mask(value).all()
    assert not C.Calibration("manual", float(value[0]) + 1e-12).voxel_mask(value).any()  # not rounded down to float32
    assert cal.flag(5.0) is True and cal.flag(4.999) is False and cal.flag(float("nan")) is None
    assert C.Calibration("manual", 1.0).flag(9.0) is None  # no scan threshold, no flag

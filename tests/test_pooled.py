"""Pooled metrics in bounded memory: binned figures agree with the exact ones (evaluation, labelled and
healthy calibration forced past a small cap), and what is held does not grow with the number of scans."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from anomaly import calibration as C
from anomaly.metrics import RankedScores
from anomaly.pooled import BinnedScores, ValuePool
from anomaly.store import open_store
from pipelines.evaluate import evaluate_run
from tests.eval_fixture import scored_run, synthetic_scans

TOL = 1e-3
"""Largest difference allowed between a binned AUROC/AUPRC/Dice (2^16 bins) and the exact one."""


def _scores(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.normal(1.0, 1.0, 20_000).astype(np.float32), rng.normal(0.0, 1.0, 400_000).astype(np.float32))


def _binned(pos: np.ndarray, neg: np.ndarray, bins: int) -> BinnedScores:
    lo, hi = float(min(pos.min(), neg.min())), float(max(pos.max(), neg.max()))
    binned = BinnedScores(lo, hi, bins)
    for a, b in zip(np.array_split(pos, 7), np.array_split(neg, 7), strict=True):  # as scans streaming by
        binned.add(a, b)
    return binned


@pytest.mark.parametrize("bins", [64, 1 << 16])
def test_binned_metrics_agree_with_exact(bins: int) -> None:
    pos, neg = _scores()
    exact, binned = RankedScores(pos, neg), _binned(pos, neg, bins)
    assert (binned.n_pos, binned.n_neg) == (pos.size, neg.size)
    error = abs(binned.auroc() - exact.auroc())
    assert error <= binned.auroc_max_error() + 1e-12  # the stated bound holds, however coarse the bins
    if bins == 64:
        assert error > 0  # coarse bins do change the figure: the comparison can fail
        return
    assert error <= TOL and abs(binned.auprc() - exact.auprc()) <= TOL
    (dice, threshold), (dice_b, threshold_b) = exact.best_dice(), binned.best_dice()
    assert abs(dice_b - dice) <= TOL and abs(threshold_b - threshold) <= binned.bin_width
    for s in (0.5, 0.9):
        t, t_b = exact.threshold_for_sensitivity(s), binned.threshold_for_sensitivity(s)
        assert t - binned.bin_width < t_b <= t  # an edge at or below: at least the sensitivity asked for
        assert binned.operating_point(t_b)["sensitivity"] >= s
        assert binned.operating_point(t_b)["tp"] == exact.operating_point(t_b)["tp"]  # counts at edges are exact


def test_marks_are_counted_exactly() -> None:
    pos, neg = _scores(1)
    exact = RankedScores(pos, neg)
    marked = BinnedScores(float(min(pos.min(), neg.min())), float(max(pos.max(), neg.max())), 32, marks=(0.7,))
    marked.add(pos, neg)
    assert marked.operating_point(0.7) == exact.operating_point(0.7)


def test_labelled_calibration_binned_agrees_with_exact() -> None:
    scans = list(synthetic_scans(8))
    maps, masks, labels = [s.amap for s in scans], [s.brain for s in scans], [s.label for s in scans]
    exact = C.calibrate_labelled(maps, masks, labels)
    binned = C.calibrate_labelled(maps, masks, labels, exact_cap=5_000)
    assert exact.metrics["pooling"]["method"] == "exact" and binned.metrics["pooling"]["method"] == "binned"
    width = binned.metrics["pooling"]["bin_width"]
    assert abs(binned.voxel_threshold - exact.voxel_threshold) <= width
    for key in ("best_dice", "voxel_auroc", "voxel_auprc"):
        assert binned.metrics[key] == pytest.approx(exact.metrics[key], abs=TOL)
    for a, b in zip(exact.metrics["operating_points"], binned.metrics["operating_points"], strict=True):
        assert abs(a["threshold"] - b["threshold"]) <= width and b["sensitivity"] >= a["target_sensitivity"]


def test_healthy_calibration_binned_agrees_with_exact() -> None:
    scans = [s for s in synthetic_scans(16) if not s.label.any()]
    maps, masks = [s.amap for s in scans], [s.brain for s in scans]
    scores = [float(np.percentile(m[b], 99)) for m, b in zip(maps, masks, strict=True)]
    exact = C.calibrate_healthy(maps, masks, scores, 0.01, n_bootstrap=200)
    binned = C.calibrate_healthy(maps, masks, scores, 0.01, n_bootstrap=200, exact_cap=5_000)
    assert binned.metrics["pooling"]["method"] == "binned"
    assert abs(binned.voxel_threshold - exact.voxel_threshold) <= binned.metrics["pooling"]["bin_width"]
    pooled = np.concatenate([m[b] for m, b in zip(maps, masks, strict=True)])
    achieved = np.count_nonzero(C.at_or_above(pooled, binned.voxel_threshold)) / pooled.size
    assert achieved <= 0.01 and achieved == pytest.approx(binned.metrics["achieved_fpr"])
    lo, hi = binned.metrics["voxel_threshold_ci"]
    e_lo, e_hi = exact.metrics["voxel_threshold_ci"]
    assert lo <= binned.voxel_threshold <= hi and lo < hi
    assert lo <= e_hi and e_lo <= hi  # the two intervals overlap


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[str, int, Path]]:
    """Scored runs of 4 and 16 synthetic scans (the first 4 the same in both)."""
    return {n: scored_run(tmp_path_factory.mktemp(f"run{n}"), n) for n in (4, 16)}


def _evaluate(run: tuple[str, int, Path], out: Path, cap: int | None = None) -> dict:
    url, run_id, labels = run
    store = open_store(url)
    try:
        kwargs = {} if cap is None else {"exact_cap": cap}
        return evaluate_run(store, run_id, labels, out, healthy_without_labels=True, progress=False,
                            **kwargs).summary
    finally:
        store.close()


def test_evaluate_binned_agrees_with_exact(runs: dict, tmp_path: Path) -> None:
    exact = _evaluate(runs[16], tmp_path / "exact")
    binned = _evaluate(runs[16], tmp_path / "binned", cap=5_000)
    pooling = binned["voxel"]["pooling"]
    assert exact["voxel"]["pooling"]["method"] == "exact" and pooling["method"] == "binned"
    assert any("bins of width" in note for note in binned["notes"])
    assert abs(binned["voxel"]["auroc"] - exact["voxel"]["auroc"]) <= min(TOL, pooling["auroc_max_error"] + 1e-12)
    assert binned["voxel"]["auprc"] == pytest.approx(exact["voxel"]["auprc"], abs=TOL)
    best, best_b = exact["voxel"]["best_dice_oracle"], binned["voxel"]["best_dice_oracle"]
    assert best_b["dice"] == pytest.approx(best["dice"], abs=TOL)
    assert abs(best_b["threshold"] - best["threshold"]) <= pooling["bin_width"]
    assert binned["voxel"]["at_threshold"] == exact["voxel"]["at_threshold"]  # the calibrated threshold: exact
    assert binned["voxel"]["n_voxels"] == exact["voxel"]["n_voxels"]
    assert (tmp_path / "binned" / "roc.png").is_file() and (tmp_path / "binned" / "dice_threshold.png").is_file()


def test_memory_held_does_not_grow_with_scans(runs: dict, tmp_path: Path) -> None:
    cap = 5_000
    small, large = (_evaluate(runs[n], tmp_path / str(n), cap=cap)["voxel"]["pooling"] for n in (4, 16))
    assert large["n_values"] > 3 * small["n_values"] > 3 * cap
    assert small["peak_values_held"] == large["peak_values_held"] <= cap  # what is held stops at the cap
    assert small["bins"] == large["bins"]
    unbounded = _evaluate(runs[16], tmp_path / "exact")["voxel"]["pooling"]
    assert unbounded["peak_values_held"] == unbounded["n_values"]  # the measure sees every value held

    held = []
    for n in (4, 16):
        scans = list(synthetic_scans(n))
        maps, masks = [s.amap for s in scans], [s.brain for s in scans]
        healthy = C.calibrate_healthy(maps, masks, [0.0] * n, 0.01, n_bootstrap=50, exact_cap=cap)
        labelled = C.calibrate_labelled(maps, masks, [s.label for s in scans], exact_cap=cap)
        held.append((healthy.metrics["pooling"]["counters_held"], healthy.metrics["pooling"]["peak_values_held"],
                     labelled.metrics["pooling"]["peak_values_held"], labelled.metrics["pooling"]["bins"]))
    assert held[0] == held[1] and max(held[0][1:3]) <= cap


def test_pool_drops_its_values_past_the_cap() -> None:
    pool = ValuePool(cap=10)
    pool.add(np.ones(3, np.float32), np.zeros(5, np.float32))
    assert pool.exact and pool.held == 8
    pool.add(np.ones(1, np.float32), np.zeros(4, np.float32))
    assert not pool.exact and pool.held == 0 and pool.peak_held == 8 and (pool.n_pos, pool.n_neg) == (4, 9)
    with pytest.raises(ValueError, match="second pass"):
        pool.ranked()


def test_cli_option_sets_the_cap(runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.cli import main

    url, run_id, labels = runs[4]
    assert main(["evaluate", "--db", url, "--run", str(run_id), "--labels", str(labels), "--out", str(tmp_path),
                 "--healthy-without-labels", "--quiet", "--exact-voxels", "5,000"]) == 0
    assert "bins of width" in capsys.readouterr().err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["voxel"]["pooling"]["method"] == "binned" and summary["voxel"]["pooling"]["exact_cap"] == 5000

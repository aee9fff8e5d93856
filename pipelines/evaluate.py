"""Evaluation of a scored run against ground-truth lesion masks: voxel AUROC/AUPRC pooled and per scan,
Dice and lesion-wise detection at the calibrated threshold, the best Dice over thresholds (an oracle
upper bound), scan-level AUROC, ROC/PR/Dice plots, a JSON summary, a per-scan CSV and a MOOD export.

Voxels are counted inside each scan's scored brain mask (``<stem>_brain.nii.gz``), where the map is
defined; lesion voxels outside it are reported per scan, never silently dropped. Maps are read one at a
time. The pooled metrics are exact while the evaluated scans hold at most ``exact_cap`` brain voxels
(default 50 million: one float32 each, plus a short-lived copy while the per-scan pieces are joined);
beyond that the maps are read a second time into fixed-size histograms (:mod:`anomaly.pooled`, 2^16 bins
per class over the pooled range, exact counts at the calibrated threshold), so memory does not grow with
the number of scans, and the summary's ``voxel.pooling`` gives the bin width. Plots are drawn at quantile
thresholds of the pooled scores (bin edges when binned); exact numbers are computed at every distinct score.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from anomaly.calibration import Calibration
from anomaly.jsonio import write_json
from anomaly.metrics import CurveMetrics, LesionStats, RankedScores, lesion_detection, scan_auroc
from anomaly.mood import MoodItem, export_mood
from anomaly.outputs import sibling
from anomaly.pooled import DEFAULT_BINS, DEFAULT_CAP, ValuePool, pooled_scores, pooling_facts
from anomaly.store import (
    Store,
    get_run,
    latest_run_id,
    merge_result_details,
    run_results,
)
from anomaly.volume import Volume, load_mask, load_volume, scan_name
from pipelines.batch import BatchError, resolve_calibration, write_csv
from pipelines.calibrate import find_label, label_index, map_grid

PER_SCAN_COLUMNS = (
    "name", "status", "label_path", "has_lesion", "score", "flagged", "n_brain_voxels", "n_lesion_voxels",
    "n_lesion_voxels_outside_brain", "auroc", "auprc", "threshold", "n_pred_voxels", "dice", "voxel_sensitivity",
    "voxel_fpr", "n_lesions", "n_detected", "lesion_sensitivity", "n_false_positive_components", "input_path",
    "map_path", "note",
)  # fmt: skip
"""Columns of ``per_scan.csv``."""

CURVE_POINTS = 2000
"""Quantile thresholds per class (lesion, normal) at which the plotted curves are drawn."""

DEFINITIONS = {
    "voxels": "every voxel metric counts voxels inside the scan's scored brain mask (<stem>_brain.nii.gz); "
              "lesion voxels outside it are listed as n_lesion_voxels_outside_brain",
    "rule": "a voxel (scan) is positive when its score is >= the threshold",
    "auroc_auprc": "exact, at every distinct score (binned above voxel.pooling.exact_cap brain voxels: see "
                   "voxel.pooling); AUPRC is average precision (as scikit-learn)",
    "best_dice": "oracle upper bound: the pooled Dice at the threshold chosen on these very labels",
    "dice": "Dice of the thresholded map (the written <stem>_mask.nii.gz) with the lesion voxels inside the brain; "
            "per scan only for scans holding lesion voxels",
    "lesions": "26-connected components; a lesion is detected when any predicted voxel touches it; predicted "
               "components smaller than the calibration's min_volume_ml (as for findings) are dropped first; "
               "a false-positive component touches no lesion",
    "scan_level": "a scan is abnormal when its label file holds any lesion voxel; the score is the run's scan score",
}


class EvaluateError(RuntimeError):
    """An evaluation that cannot be done as asked (no labels, unknown calibration); the message says the fix."""


@dataclass(frozen=True)
class EvalScan:
    """One ok result of the run: its map, scored brain mask, scan score and (when found) label file."""

    stem: str
    input_path: str
    map_path: Path
    score: float
    label_path: Path | None = None


@dataclass
class EvaluationReport:
    """What an evaluation wrote: the summary (as in ``summary.json``), per-scan rows and the files."""

    out_dir: Path
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    files: dict[str, Path] = field(default_factory=dict)


def resolve_run(store: Store, run_id: int | None, calibration: str | None = None, *, force_calibration: bool = False
                ) -> tuple[dict[str, Any], list[EvalScan], Calibration | None]:
    """The run's facts (the latest run when ``run_id`` is None), its ok results (by name) and the calibration
    to apply (``calibration``, checked as ``score`` checks it, or the run's own)."""
    with store.session() as s:
        if run_id is None:
            run_id = latest_run_id(s)
            if run_id is None:
                raise EvaluateError(f"{store.url} holds no runs; score scans with `anomaly score` first")
        run = get_run(s, run_id)
        info = {"run_id": run.id, "model": run.model.name, "run_out_dir": run.out_dir,
                "settings_hash": run.settings_hash}
        model_id, settings_hash, settings = run.model_id, run.settings_hash, dict(run.settings or {})
        cal = Calibration.from_stored(run.calibration) if run.calibration is not None else None
        scans = [EvalScan(stem=scan_name(r.map_path).removesuffix("_anomaly"), input_path=r.input_path,
                          map_path=Path(r.map_path), score=float(r.score) if r.score is not None else math.nan)
                 for r in run_results(s, run_id, status="ok", order="name") if r.map_path]
    if calibration is not None:
        try:
            cal = resolve_calibration(store, calibration, model_id, settings_hash, settings or None,
                                      force=force_calibration)[1]
        except BatchError as exc:
            raise EvaluateError(str(exc)) from exc
    if not scans:
        raise EvaluateError(f"run {run_id} has no successfully scored scans; score some with `anomaly score` first")
    return info, scans, cal


@dataclass
class _ScanPart:
    row: dict[str, Any]
    positives: np.ndarray
    negatives: np.ndarray
    lesions: LesionStats | None
    has_lesion: bool
    map_range: tuple[float, float]


def _none_if_nan(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def read_scan(scan: EvalScan) -> tuple[Volume, np.ndarray, np.ndarray]:
    """The scan's map, scored brain mask and lesion mask (all-false without a label file), on the map's grid."""
    volume = load_volume(scan.map_path)
    grid = map_grid(scan.map_path)
    brain = load_mask(sibling(scan.map_path, "brain"), like=grid)
    truth = load_mask(scan.label_path, like=grid) if scan.label_path is not None else np.zeros(grid.shape, bool)
    return volume, brain, truth


def split_brain(amap: np.ndarray, brain: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The brain voxels' scores split by label: ``(lesion, non-lesion)``."""
    inside_truth = truth[brain]
    values = amap[brain]
    return values[inside_truth], values[~inside_truth]


def evaluate_scan(scan: EvalScan, calibration: Calibration | None) -> _ScanPart:
    """Per-scan metrics, and the scan's brain voxel scores split by label for the pooled metrics."""
    volume, brain, truth = read_scan(scan)
    amap = volume.data
    positives, negatives = split_brain(amap, brain, truth)
    row: dict[str, Any] = {
        "name": scan.stem, "status": "evaluated", "input_path": scan.input_path, "map_path": str(scan.map_path),
        "label_path": str(scan.label_path) if scan.label_path else "", "score": _none_if_nan(scan.score),
        "has_lesion": bool(truth.any()), "n_brain_voxels": int(brain.sum()), "n_lesion_voxels": int(positives.size),
        "n_lesion_voxels_outside_brain": int(np.count_nonzero(truth & ~brain)),
        "note": "" if scan.label_path else "no label file: counted as lesion-free",
    }
    if positives.size:
        ranked = RankedScores(positives, negatives)
        row["auprc"] = ranked.auprc()
        if negatives.size:
            row["auroc"] = ranked.auroc()
        del ranked
    lesions = None
    if calibration is not None:
        threshold = calibration.voxel_threshold
        pred = calibration.voxel_mask(amap, brain)  # the very mask `score` writes
        gt = truth & brain
        tp = int(np.count_nonzero(pred & gt))
        n_pred = int(np.count_nonzero(pred))
        fp = n_pred - tp
        row.update(threshold=threshold, n_pred_voxels=n_pred,
                   voxel_fpr=fp / negatives.size if negatives.size else None,
                   voxel_sensitivity=tp / positives.size if positives.size else None,
                   dice=2.0 * tp / (n_pred + positives.size) if positives.size else None)
        lesions = lesion_detection(calibration.lesion_mask(pred, volume.voxel_volume_ml), gt)
        row.update(n_lesions=lesions.n_lesions, n_detected=lesions.n_detected,
                   lesion_sensitivity=lesions.sensitivity,
                   n_false_positive_components=lesions.n_false_positive_components)
        flagged = calibration.flag(scan.score)
        if flagged is not None:
            row["flagged"] = flagged
    return _ScanPart(row, positives, negatives, lesions, bool(truth.any()),
                     (float(amap.min()), float(amap.max())))


def curve_at_quantiles(ranked: CurveMetrics, points: int = CURVE_POINTS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(thresholds, tp, fp)`` at up to ``points`` quantiles of each class, decreasing thresholds, ending at
    the lowest score (where every voxel is positive): for drawing; the metrics use every distinct score.
    Binned scores give their curve at the non-empty bins' edges."""
    if not isinstance(ranked, RankedScores):
        return ranked.curve()
    parts = []
    for values in (ranked.positives, ranked.negatives):
        if values.size:
            index = np.unique(np.linspace(0, values.size - 1, min(points, values.size)).round().astype(np.int64))
            parts.append(values[index])
    thresholds = np.unique(np.concatenate(parts))[::-1]
    tp, fp = ranked.counts_at(thresholds)
    return thresholds.astype(np.float64), tp, fp


def _plots(ranked: CurveMetrics, summary: dict[str, Any], scores: Sequence[float], scan_truth: Sequence[bool],
           calibration: Calibration | None, out: Path) -> dict[str, Path]:
    from anomaly.plots import plot_dice_curve, plot_pr, plot_roc, plot_score_histogram, save_figure

    files: dict[str, Path] = {}
    voxel = summary["voxel"]
    if ranked.n_pos:
        thresholds, tp, fp = curve_at_quantiles(ranked)
        at = voxel.get("at_threshold") or {}
        if ranked.n_neg:
            fpr = np.concatenate([[0.0], fp / ranked.n_neg])
            tpr = np.concatenate([[0.0], tp / ranked.n_pos])
            point = (at["fpr"], at["sensitivity"]) if at else None
            files["roc"] = save_figure(plot_roc(fpr, tpr, auc=voxel["auroc"], operating_point=point,
                                                title="Voxel ROC (pooled)"), out / "roc.png")
        files["pr"] = save_figure(plot_pr(tp / (tp + fp), tp / ranked.n_pos, ap=voxel["auprc"],
                                          prevalence=ranked.n_pos / (ranked.n_pos + ranked.n_neg),
                                          title="Voxel precision-recall (pooled)"), out / "pr.png")
        best = voxel["best_dice_oracle"]
        files["dice"] = save_figure(plot_dice_curve(thresholds, 2.0 * tp / (tp + fp + ranked.n_pos),
                                                    best=(best["dice"], best["threshold"]),
                                                    threshold=calibration.voxel_threshold if calibration else None,
                                                    title="Pooled Dice against threshold"), out / "dice_threshold.png")
    finite = [(s, t) for s, t in zip(scores, scan_truth, strict=True) if math.isfinite(s)]
    if finite:
        files["scan_scores"] = save_figure(plot_score_histogram(
            [s for s, _ in finite], calibration.scan_threshold if calibration else None, [t for _, t in finite]),
            out / "scan_scores.png")
    return files


def _mood(scans: Sequence[EvalScan], out: Path, ranges: tuple[float, float], scores: Sequence[float],
          progress: bool) -> Path:
    """MOOD layout for every ok scan of the run, one scan at a time with ranges shared by all of them."""
    lo, hi = ranges
    if not hi > lo:
        hi = lo + 1.0
    finite = [s for s in scores if math.isfinite(s)]
    s_lo, s_hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if not s_hi > s_lo:
        s_hi = s_lo + 1.0
    for scan in _bar(scans, progress, "MOOD export"):
        volume = load_volume(scan.map_path)
        score = scan.score if math.isfinite(scan.score) else s_lo
        export_mood([MoodItem(scan.stem, volume.data, volume.affine, score)], out, pixel_range=(lo, hi),
                    sample_range=(s_lo, s_hi))
    return out


def _bar(items: Iterable[Any], enabled: bool, desc: str) -> Iterable[Any]:
    if not enabled:
        return items
    return tqdm(items, desc=desc, unit="scan", file=sys.stderr, disable=None, dynamic_ncols=True, leave=False)


def _pieces(scans: Sequence[EvalScan], progress: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Second pass (past the exact cap): each evaluated scan's brain scores split by label, read again."""
    for scan in _bar(scans, progress, "pooling (binned)"):
        volume, brain, truth = read_scan(scan)
        yield split_brain(volume.data, brain, truth)


def evaluate_run(store: Store, run_id: int | None, labels_dir: str | os.PathLike[str],
                 out_dir: str | os.PathLike[str] | None = None, *, calibration: str | None = None,
                 force_calibration: bool = False, healthy_without_labels: bool = False,
                 mood_dir: str | os.PathLike[str] | None = None, progress: bool = True,
                 exact_cap: int = DEFAULT_CAP, bins: int = DEFAULT_BINS) -> EvaluationReport:
    """Evaluate run ``run_id`` (None: the latest) against the masks in ``labels_dir`` (named like the scans) and
    write the summary, per-scan CSV, plots and MOOD export into ``out_dir`` (default ``<run out dir>/evaluation``).
    Pooled voxel figures are exact up to ``exact_cap`` brain voxels, binned in ``bins`` bins above it."""
    info, scans, cal = resolve_run(store, run_id, calibration, force_calibration=force_calibration)
    run_id = info["run_id"]
    index = label_index(labels_dir)
    out = Path(out_dir).expanduser() if out_dir is not None else Path(info["run_out_dir"]) / "evaluation"
    notes: list[str] = []
    paired: list[EvalScan] = []
    rows: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    for scan in scans:
        if not scan.map_path.is_file():
            notes.append(f"{scan.stem}: map {scan.map_path} is missing; left out")
            rows[scan.stem] = {"name": scan.stem, "status": "skipped", "input_path": scan.input_path,
                               "map_path": str(scan.map_path), "note": "map file missing"}
            continue
        label = find_label(index, scan.stem, scan.input_path)
        if label is None and not healthy_without_labels:
            skipped.append(scan.stem)
            rows[scan.stem] = {"name": scan.stem, "status": "skipped", "input_path": scan.input_path,
                               "map_path": str(scan.map_path), "score": _none_if_nan(scan.score),
                               "note": "no label file (pass --healthy-without-labels to count it as lesion-free)"}
        else:
            rows[scan.stem] = {}  # an empty row marks a scan to evaluate; filled below, in the run's order
        paired.append(EvalScan(scan.stem, scan.input_path, scan.map_path, scan.score, label))
    if skipped:
        notes.append(f"{len(skipped)} scan(s) without a label file in {labels_dir} left out of the metrics: "
                     f"{', '.join(skipped[:10])}{' ...' if len(skipped) > 10 else ''} (pass --healthy-without-labels "
                     "to count them as lesion-free)")
    if not any(not row for row in rows.values()):
        raise EvaluateError(f"no scan of run {run_id} has a label file in {labels_dir}; name each mask like its "
                            "scan (<name>.nii.gz), or pass --healthy-without-labels for healthy scans")

    pool = ValuePool(exact_cap)
    lesion_total: LesionStats | None = None
    pixel_lo, pixel_hi = math.inf, -math.inf
    scan_scores: list[float] = []
    scan_truth: list[bool] = []
    for scan in _bar(paired, progress, "evaluating"):
        if rows[scan.stem]:  # skipped for want of a label: read only for the shared MOOD range
            data = load_volume(scan.map_path).data
            pixel_lo, pixel_hi = min(pixel_lo, float(data.min())), max(pixel_hi, float(data.max()))
            continue
        part = evaluate_scan(scan, cal)
        pixel_lo, pixel_hi = min(pixel_lo, part.map_range[0]), max(pixel_hi, part.map_range[1])
        pool.add(part.positives, part.negatives)
        if part.lesions is not None:
            lesion_total = part.lesions if lesion_total is None else lesion_total + part.lesions
        scan_scores.append(scan.score)
        scan_truth.append(part.has_lesion)
        rows[scan.stem] = part.row
    evaluated_rows = {stem: row for stem, row in rows.items() if row["status"] == "evaluated"}

    evaluated = [scan for scan in paired if rows[scan.stem].get("status") == "evaluated"]
    ranked = pooled_scores(pool, lambda: _pieces(evaluated, progress), bins=bins,
                           marks=() if cal is None else (cal.voxel_threshold,))
    summary = _summary(info, labels_dir, cal, ranked, evaluated_rows, lesion_total, scan_scores, scan_truth, notes,
                       n_ok=len(scans), n_skipped=len(skipped), healthy_without_labels=healthy_without_labels)
    summary["voxel"]["pooling"] = pooling_facts(ranked, pool)
    if not pool.exact:
        summary["notes"].append(summary["voxel"]["pooling"]["note"])
    files: dict[str, Path] = {}
    try:
        files.update(_plots(ranked, summary, scan_scores, scan_truth, cal, out))
    except ImportError as exc:  # matplotlib is the optional `eval` extra; the numbers do not need it
        summary["notes"].append(f"plots not drawn: {exc}")
    del ranked
    mood = Path(mood_dir).expanduser() if mood_dir is not None else out / "mood"
    files["mood"] = _mood(paired, mood, (pixel_lo, pixel_hi), [s.score for s in paired], progress)
    files["per_scan"] = write_csv(out / "per_scan.csv", list(rows.values()), PER_SCAN_COLUMNS)
    summary["files"] = {k: str(v) for k, v in files.items()} | {"summary": str(out / "summary.json")}
    summary["mood"] = {"pixel_range": [pixel_lo, pixel_hi], "n_scans": len(paired),
                       "note": "pixel maps and scan scores rescaled by one shared affine map to [0, 1] "
                               "(global minimum and maximum), so every ranking is kept"}
    files["summary"] = write_json(out / "summary.json", summary)
    record_label_paths(store, run_id, {s.input_path: s.label_path for s in paired if s.label_path is not None})
    return EvaluationReport(out_dir=out, summary=summary, rows=list(rows.values()), files=files)


def record_label_paths(store: Store, run_id: int, labels: dict[str, Path]) -> int:
    """Remember each result's label mask (``details["label_path"]``) so the dashboard can draw voxel curves."""
    with store.session() as s:
        return merge_result_details(s, run_id, {path: {"label_path": str(Path(label).resolve())}
                                                for path, label in labels.items()})


def _mean(values: Iterable[Any]) -> float | None:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(finite) / len(finite) if finite else None


def _summary(info: dict[str, Any], labels_dir: str | os.PathLike[str], cal: Calibration | None,
             ranked: CurveMetrics, rows: dict[str, dict[str, Any]], lesions: LesionStats | None,
             scores: list[float], truth: list[bool], notes: list[str], *, n_ok: int, n_skipped: int,
             healthy_without_labels: bool) -> dict[str, Any]:
    per_scan = list(rows.values())
    voxel: dict[str, Any] = {
        "n_voxels": ranked.n_pos + ranked.n_neg, "n_lesion_voxels": ranked.n_pos,
        "n_lesion_voxels_outside_brain": sum(r["n_lesion_voxels_outside_brain"] for r in per_scan),
        "prevalence": ranked.n_pos / (ranked.n_pos + ranked.n_neg) if ranked.n_pos + ranked.n_neg else None,
        "auroc": ranked.auroc() if ranked.n_pos and ranked.n_neg else None,
        "auprc": ranked.auprc() if ranked.n_pos else None,
        "per_scan_mean": {"auroc": _mean(r.get("auroc") for r in per_scan),
                          "auprc": _mean(r.get("auprc") for r in per_scan),
                          "dice": _mean(r.get("dice") for r in per_scan)},
    }
    if ranked.n_pos:
        best, threshold = ranked.best_dice()
        voxel["best_dice_oracle"] = {"dice": best, "threshold": threshold,
                                     "note": "oracle upper bound: threshold chosen on these labels, not a result"}
    else:
        notes.append("the evaluated scans hold no lesion voxels inside their brain masks: AUROC, AUPRC and Dice are "
                     "undefined; false-positive rates are reported")
    if cal is not None:
        voxel["at_threshold"] = ranked.operating_point(cal.voxel_threshold)
    else:
        notes.append("no calibration (the run has none and --calibration was not given): Dice, lesion detection "
                     "and flags at a threshold are not reported")
    scan: dict[str, Any] = {"n_abnormal": int(sum(truth)), "n_normal": int(len(truth) - sum(truth)), "auroc": None}
    finite = [(s, t) for s, t in zip(scores, truth, strict=True) if math.isfinite(s)]
    if any(t for _, t in finite) and not all(t for _, t in finite):
        scan["auroc"] = scan_auroc([s for s, _ in finite], [t for _, t in finite])
    else:
        scan["auroc_note"] = "scan AUROC needs both abnormal and normal scans"
    if cal is not None and cal.scan_threshold is not None:
        flagged = [bool(cal.flag(s)) for s, _ in finite]
        abnormal = [f for f, (_, t) in zip(flagged, finite, strict=True) if t]
        normal = [f for f, (_, t) in zip(flagged, finite, strict=True) if not t]
        scan["at_threshold"] = {"threshold": cal.scan_threshold, "n_flagged": int(sum(flagged)),
                                "sensitivity": sum(abnormal) / len(abnormal) if abnormal else None,
                                "specificity": (len(normal) - sum(normal)) / len(normal) if normal else None}
    lesion = None
    if lesions is not None and cal is not None:
        lesion = {**lesions.to_dict(), "min_volume_ml": cal.min_volume_ml,
                  "false_positive_components_per_scan": lesions.n_false_positive_components / max(len(per_scan), 1)}
    return {
        "run_id": info["run_id"], "model": info["model"], "run_out_dir": info["run_out_dir"],
        "labels_dir": str(Path(labels_dir).expanduser().resolve()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "calibration": None if cal is None else {
            "ref": cal.ref, "method": cal.method, "voxel_threshold": cal.voxel_threshold,
            "scan_threshold": cal.scan_threshold, "min_volume_ml": cal.min_volume_ml},
        "scans": {"ok_results": n_ok, "evaluated": len(per_scan), "skipped_without_labels": n_skipped,
                  "healthy_without_labels": healthy_without_labels,
                  "with_lesions": int(sum(1 for r in per_scan if r["has_lesion"]))},
        "voxel": voxel, "lesion": lesion, "scan": scan, "notes": notes, "definitions": DEFINITIONS,
    }

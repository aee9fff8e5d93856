"""Calibration page: histogram of scan scores with the threshold line, scan-level ROC/PR from review
verdicts, voxel-level ROC/PR and Dice-versus-threshold when label masks are recorded, and saving the
chosen thresholds as a named manual calibration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from anomaly.calibration import Calibration
from anomaly.outputs import sibling
from anomaly.records import CalibrationData, ResultDetails
from anomaly.store import (
    RunSummary,
    ScoreSummary,
    Store,
    count_at_least,
    get_run,
    labelled_results,
    list_calibrations,
    reviewed_scores,
    save_calibration,
    score_summary,
)
from dashboard import state
from dashboard.curves import (
    NEGATIVE_VERDICTS,
    POSITIVE_VERDICTS,
    ScanLabels,
    VoxelCurves,
    labels_of_verdicts,
    operating_point,
    scan_curves,
    voxel_curves,
)
from dashboard.db import get_store
from dashboard.paths import UnsafePathError, result_file
from dashboard.text import plain
from dashboard.views.common import empty_runs, selected_run
from dashboard.volumes import VolumeLoadError, load

SCAN_THRESHOLD = "cal_scan_threshold"
VOXEL_THRESHOLD = "cal_voxel_threshold"
NAME = "cal_name"
CAL_RUN = "_cal_run"
PERSISTENT_KEYS: tuple[str, ...] = (SCAN_THRESHOLD, VOXEL_THRESHOLD)
MAX_LABELLED = 40
"""Labelled scans pooled for the voxel curves (the highest-scoring ones beyond this are left out)."""


def histogram(summary: ScoreSummary, threshold: float) -> alt.LayerChart:
    """Histogram of scan scores (binned in the database) with a red line at the threshold."""
    data = pd.DataFrame({"start": summary.edges[:-1], "end": summary.edges[1:], "scans": summary.counts})
    bars = (
        alt.Chart(data)
        .mark_bar(opacity=0.8)
        .encode(
            x=alt.X("start:Q", title="scan score"),
            x2="end:Q",
            y=alt.Y("scans:Q", title="scans"),
        )
    )
    rule = (
        alt.Chart(pd.DataFrame({"threshold": [threshold]}))
        .mark_rule(color="red", strokeWidth=2)
        .encode(x="threshold:Q")
    )
    return (bars + rule).properties(height=260)


def line_chart(
    x: np.ndarray,
    y: np.ndarray,
    x_title: str,
    y_title: str,
    point: tuple[float | None, float | None] | None = None,
    rule_x: float | None = None,
) -> alt.LayerChart | alt.Chart:
    """A curve with an optional red point (the operating point) and red vertical line (the threshold)."""
    data = pd.DataFrame({"x": np.asarray(x, dtype=float), "y": np.asarray(y, dtype=float)})
    chart: Any = (
        alt.Chart(data)
        .mark_line(interpolate="step-after" if len(data) < 60 else "linear")
        .encode(x=alt.X("x:Q", title=x_title), y=alt.Y("y:Q", title=y_title))
    )
    if point is not None and all(v is not None for v in point):
        chart = chart + alt.Chart(pd.DataFrame({"x": [point[0]], "y": [point[1]]})).mark_point(
            color="red", size=90, filled=True
        ).encode(x="x:Q", y="y:Q")
    if rule_x is not None:
        chart = chart + alt.Chart(pd.DataFrame({"x": [rule_x]})).mark_rule(color="red").encode(x="x:Q")
    return chart.properties(height=240)


@dataclass(frozen=True)
class Labelled:
    """What the voxel curves need of a labelled result: its id, recorded files and details."""

    id: int
    input_path: str
    map_path: str | None
    details: dict[str, Any]


@dataclass(frozen=True)
class RunData:
    """What the page reads of a run: the score histogram, the reviewed scores and the labelled results."""

    summary: ScoreSummary | None
    labels: ScanLabels
    curves: dict[str, Any] | None
    """Scan ROC/PR from the verdicts (thinned for drawing), when there are scans of both kinds."""
    labelled: list[Labelled]
    more_labelled: bool


@st.cache_data(max_entries=16, show_spinner=False)
def run_data(url: str, run_id: int, version: int) -> RunData:
    """The run's data for this page, read once per version of the run (every write to its results or
    reviews bumps it, so a saved verdict or a new score is seen at the next rerun)."""
    store = get_store()
    with store.session() as s:
        summary = score_summary(s, run_id, bins=40, quantiles=(0.95,))
        reviewed = reviewed_scores(s, run_id)
        found, more = labelled_results(s, run_id, "label_path", MAX_LABELLED)  # ResultDetails.label_path
        labelled = [Labelled(r.id, r.input_path, r.map_path, dict(r.details)) for r in found
                    if ResultDetails.from_dict(r.details).label_path]
    labels = labels_of_verdicts(reviewed.scores, reviewed.verdicts, reviewed.n_unreviewed)
    return RunData(summary, labels, scan_curves(labels) if labels.usable else None, labelled, more)


@st.cache_data(max_entries=8, show_spinner="Pooling labelled voxels…")
def _voxel_curves(sources: tuple[tuple[str, str, str, int, int], ...]) -> VoxelCurves:
    """Curves of (map, label, brain mask or "", map mtime, label mtime) files; the times make a changed
    file count as new."""
    triples = [(load(Path(m)).volume.data, load(Path(lab)).volume.data, load(Path(b)).volume.data if b else None)
               for m, lab, b, _, _ in sources]
    return voxel_curves(triples)


def _brain_beside(map_path: Path) -> Path | None:
    """The scored brain mask written beside a map (same folder, so as safe as the map), if there is one."""
    try:
        path = sibling(map_path, "brain")
    except ValueError:
        return None
    return path if path.is_file() else None


def voxel_section(data: RunData, out_dir: str) -> VoxelCurves | None:
    """Voxel-level curves from recorded label masks; explains what is missing when there are none."""
    results, more = data.labelled, data.more_labelled
    if not results:
        st.caption(
            "Voxel-level ROC/PR and Dice-versus-threshold need label masks. None are recorded for this run "
            "(a result's label path, recorded when scans are evaluated with labels); "
            "`anomaly evaluate --labels DIR` computes them offline."
        )
        return None
    sources, problems = [], []
    for result in results:
        try:
            map_path, label_path = result_file(result, out_dir, "anomaly"), result_file(result, out_dir, "label")
        except UnsafePathError as exc:
            problems.append(str(exc))
            continue
        if map_path is None or label_path is None or not map_path.exists() or not label_path.exists():
            problems.append(f"result {result.id}: map or label file missing")
            continue
        brain_path = _brain_beside(map_path)
        sources.append(
            (str(map_path), str(label_path), str(brain_path or ""),
             map_path.stat().st_mtime_ns, label_path.stat().st_mtime_ns)
        )
    for problem in problems[:5]:
        st.warning(plain(problem))
    if not sources:
        return None
    try:
        curves = _voxel_curves(tuple(sources))
    except (ValueError, VolumeLoadError) as exc:
        st.warning(f"Voxel curves unavailable: {plain(exc)}")
        return None
    st.caption(
        f"Pooled over {curves.n_scans} labelled scans ({curves.n_lesion_voxels} lesion voxels)"
        + (f"; labelled scans beyond the {MAX_LABELLED} highest-scoring are left out" if more else "")
        + "."
    )
    return curves


def flagged_at(store: Store, run_id: int, threshold: float) -> int:
    """Scored scans of the run at or above ``threshold`` (counted in the database)."""
    with store.session() as s:
        return count_at_least(s, run_id, threshold)


def _init(run_id: int, scan_default: float, voxel_default: float | None) -> None:
    ss = st.session_state
    if ss.get(CAL_RUN) != run_id:
        ss[SCAN_THRESHOLD] = scan_default
        ss[VOXEL_THRESHOLD] = voxel_default
        ss[NAME] = f"manual-run{run_id}"
        ss[CAL_RUN] = run_id


def _save(store: Store, run_id: int, model_id: int, settings_hash: str, settings: dict[str, Any] | None,
          metrics: dict[str, Any]) -> None:
    ss = st.session_state
    name = str(ss.get(NAME, "") or "").strip()
    voxel = ss.get(VOXEL_THRESHOLD)
    if voxel is None:
        state.flash("Enter a voxel threshold before saving the calibration.", "warning")
        return
    try:
        with store.session() as s:
            saved = save_calibration(
                s,
                name,
                model_id,
                "manual",
                float(voxel),
                scan_threshold=float(ss[SCAN_THRESHOLD]),
                settings_hash=settings_hash,
                data=CalibrationData(
                    source="dashboard",
                    run_id=run_id,
                    reviewer=ss.get(state.REVIEWER) or None,
                    scan_labels="review verdicts: confirmed finding = abnormal; normal, false positive = normal",
                    settings=settings,
                ).to_dict(),
                metrics=metrics,
            )
            ref = saved.ref
    except ValueError as exc:
        state.flash(f"Calibration not saved: {plain(exc)}", "error")
        return
    state.flash(
        f"Saved calibration **{plain(ref)}** (voxel threshold {float(voxel):.4g}, scan threshold "
        f"{float(ss[SCAN_THRESHOLD]):.4g}). Apply it with `anomaly score ... --calibration {ref}`."
    )


def render(store: Store, run_list: list[RunSummary]) -> None:
    """Draw the calibration page for the run chosen in the sidebar."""
    st.header("Calibration")
    run = selected_run(run_list)
    if run is None:
        empty_runs()
        return
    data = run_data(store.url, run.run_id, run.version)  # histogram and reviewed scores, never the whole run
    summary, labels = data.summary, data.labels
    with store.session() as s:
        run_row = get_run(s, run.run_id)
        model_id, settings_hash, out_dir = run_row.model_id, run_row.settings_hash, run_row.out_dir
        run_settings = dict(run_row.settings) if run_row.settings else None
        current = Calibration.from_stored(run_row.calibration) if run_row.calibration is not None else None
        calibrations = list_calibrations(s, model_id)
        saved_rows = [
            {
                "calibration": c.ref,
                "method": c.method,
                "voxel threshold": c.voxel_threshold,
                "scan threshold": c.scan_threshold,
                "target FPR": c.target_fpr,
                "created": f"{c.created_at:%Y-%m-%d %H:%M}",
            }
            for c in calibrations
        ]
    if summary is None:
        st.info(f"Run {run.run_id} has no scored scans yet; calibration needs scan scores.")
        return
    low, high = summary.low, summary.high
    if high <= low:
        high = low + 1.0
    scan_default = (
        current.scan_threshold
        if current is not None and current.scan_threshold is not None
        else summary.quantiles[0.95]
    )
    _init(
        run.run_id,
        float(min(max(scan_default, low), high)),
        None if current is None else current.voxel_threshold,
    )
    ss = st.session_state
    ss[SCAN_THRESHOLD] = float(min(max(float(ss[SCAN_THRESHOLD]), low), high))
    if current is not None:
        st.caption(
            f"This run was scored with calibration **{plain(current.ref)}** ({current.method}): voxel threshold "
            f"{current.voxel_threshold:.4g}, scan threshold "
            f"{'none' if current.scan_threshold is None else f'{current.scan_threshold:.4g}'}."
        )
    else:
        st.caption("This run was scored without a calibration.")

    st.subheader("Scan scores")
    st.slider(
        "Scan threshold",
        low,
        high,
        key=SCAN_THRESHOLD,
        step=(high - low) / 500,
        format="%.4g",
        help="A scan is flagged when its score is at or above this value.",
    )
    threshold = float(ss[SCAN_THRESHOLD])
    c1, c2 = st.columns([2, 1])
    c1.altair_chart(histogram(summary, threshold), width="stretch")
    n_flag = flagged_at(store, run.run_id, threshold)
    c2.metric("Flagged at this threshold", f"{n_flag} of {summary.n}")
    metrics: dict[str, Any] = {"n_scans": summary.n, "n_flagged": n_flag}
    if labels.n_pos or labels.n_neg:
        point = operating_point(labels.scores, labels.labels, threshold)
        metrics["verdicts"] = {"n_abnormal": labels.n_pos, "n_normal": labels.n_neg, **point}
        c2.metric(
            "Sensitivity (reviewed)", "—" if point["sensitivity"] is None else f"{point['sensitivity']:.2f}"
        )
        c2.metric("False-positive rate (reviewed)", "—" if point["fpr"] is None else f"{point['fpr']:.2f}")

    st.subheader("Scan-level ROC and PR from review verdicts")
    st.caption(
        f"Abnormal = {', '.join(POSITIVE_VERDICTS)}; normal = {', '.join(NEGATIVE_VERDICTS)}; "
        f"other verdicts and unreviewed scans are left out ({labels.n_excluded} with another verdict, "
        f"{labels.n_unreviewed} unreviewed)."
    )
    curves = data.curves
    if curves is not None:
        point = operating_point(labels.scores, labels.labels, threshold)
        metrics.update(scan_auroc_reviewed=curves["auroc"], scan_auprc_reviewed=curves["auprc"])
        r1, r2 = st.columns(2)
        r1.altair_chart(
            line_chart(
                curves["fpr"],
                curves["tpr"],
                "false-positive rate",
                "sensitivity",
                (point["fpr"], point["sensitivity"]),
            ),
            width="stretch",
        )
        r1.caption(
            f"ROC · AUROC {curves['auroc']:.3f} ({labels.n_pos} abnormal, {labels.n_neg} normal scans)"
        )
        r2.altair_chart(
            line_chart(
                curves["recall"],
                curves["precision"],
                "recall",
                "precision",
                (point["sensitivity"], point["precision"]),
            ),
            width="stretch",
        )
        r2.caption(f"PR · AUPRC {curves['auprc']:.3f}")
    else:
        st.info(
            f"Needs reviewed scans of both kinds: {labels.n_pos} abnormal and {labels.n_neg} normal so far. "
            "Review more scans in the viewer."
        )

    st.subheader("Voxel threshold")
    voxel = voxel_section(data, out_dir)
    if voxel is not None and ss.get(VOXEL_THRESHOLD) is None:
        ss[VOXEL_THRESHOLD] = float(voxel.best_threshold)
    st.columns([1, 2])[0].number_input(
        "Voxel threshold",
        key=VOXEL_THRESHOLD,
        value=None,
        format="%.6g",
        step=None,
        placeholder="e.g. the run's calibrated value",
        help="A voxel belongs to a finding when its anomaly value is at or above this threshold.",
    )
    chosen_voxel = ss.get(VOXEL_THRESHOLD)
    if voxel is not None:
        v1, v2, v3 = st.columns(3)
        v1.altair_chart(
            line_chart(
                voxel.thresholds,
                voxel.dice,
                "voxel threshold",
                "pooled Dice",
                rule_x=None if chosen_voxel is None else float(chosen_voxel),
            ),
            width="stretch",
        )
        v1.caption(f"Dice vs threshold · best {voxel.best_dice:.3f} at {voxel.best_threshold:.4g} (oracle)")
        if voxel.auroc is not None:
            v2.altair_chart(
                line_chart(voxel.fpr, voxel.sensitivity, "false-positive rate", "sensitivity"),
                width="stretch",
            )
            v2.caption(f"voxel ROC · AUROC {voxel.auroc:.3f}")
        v3.altair_chart(
            line_chart(voxel.sensitivity, voxel.precision, "recall", "precision"), width="stretch"
        )
        v3.caption(f"voxel PR · AUPRC {voxel.auprc:.3f}")
        metrics.update(
            voxel_best_dice=voxel.best_dice,
            voxel_auprc=voxel.auprc,
            voxel_auroc=voxel.auroc,
            n_labelled_scans=voxel.n_scans,
        )
        if chosen_voxel is not None:
            metrics["voxel_dice"] = voxel.dice_at(float(chosen_voxel))

    st.subheader("Save as a named calibration")
    with st.form("save_calibration", border=True):
        st.text_input("Name", key=NAME, help="Saved as the next version of this name (NAME@1, NAME@2, …).")
        st.caption(
            f"Saves method `manual` for model {plain(run.model_name)} with the voxel threshold above and scan "
            f"threshold {threshold:.4g}."
        )
        st.form_submit_button(
            "Save calibration",
            icon=":material/save:",
            type="primary",
            on_click=_save,
            args=(store, run.run_id, model_id, settings_hash, run_settings, metrics),
        )
    if saved_rows:
        st.markdown("**Calibrations of this model**")
        st.dataframe(saved_rows, hide_index=True, width="stretch")

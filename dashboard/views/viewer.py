"""Scan viewer: axial, coronal and sagittal slices with sliders and a crosshair that jumps to the peak or
a finding, window/level, the anomaly map as a thresholded colour overlay (calibrated threshold
pre-selected), input | reconstruction | residual side by side, the findings, the review panel, and
an interactive NiiVue view. This module draws the page around the pictures (:mod:`dashboard.views.slices`):
which scan, its neighbours, header, findings and details; each rerun reads the scan in view and its two
neighbours through indexed look-ups, never the run."""

from __future__ import annotations

from typing import Any

import streamlit as st

from anomaly.contrast import contrast_label
from anomaly.records import ResultDetails
from anomaly.store import ResultDetail, RunSummary, Store, get_result_detail, neighbours, result_page
from anomaly.viz import range_to_window
from dashboard import state
from dashboard.paths import UnsafePathError, display_path, result_file
from dashboard.scan_files import ScanVolumes, jump_targets, load_scan
from dashboard.text import plain
from dashboard.views import review
from dashboard.views.common import empty_runs, fmt_score, selected_run
from dashboard.views.slices import (
    AXIS_KEYS,
    JUMP,
    KEEP_THRESHOLD,
    LEVEL,
    LOADED,
    PERSISTENT_KEYS,
    SHOW_BRAIN,
    SHOW_MASK,
    THRESHOLD,
    VIEW_DEFAULTS,
    WINDOW,
    _set_position,
    calibrated_threshold,
    compare,
    display_settings,
    planes,
    toolbar,
    view_3d,
)
from dashboard.volumes import prefetch

PREFETCHED = "_vw_prefetched"
"""The scan whose files were last read ahead (read ahead once, not on every rerun)."""

__all__ = ["AXIS_KEYS", "PERSISTENT_KEYS", "SHOW_BRAIN", "load_scan", "render"]


def prefetch_next(store: Store, result_id: int | None) -> None:
    """Start reading the next scan's files in the background so that Next and Save & next are instant."""
    if result_id is None or st.session_state.get(PREFETCHED) == result_id:
        return
    st.session_state[PREFETCHED] = result_id
    with store.session() as s:
        upcoming = get_result_detail(s, result_id)
    if upcoming is None or upcoming.result.status != "ok":
        return
    paths = []
    for kind in ("anomaly", "input", "recon", "brain"):
        try:
            path = result_file(upcoming.result, upcoming.out_dir, kind)
        except UnsafePathError:
            continue
        if path is not None and path.is_file():
            paths.append(path)
    prefetch(paths)


def _goto(result_id: int) -> None:
    st.session_state[state.RESULT] = result_id


def init_scan(detail: ResultDetail, vols: ScanVolumes, targets: dict[str, Any]) -> None:
    """Per-scan defaults when a scan is opened: crosshair on the first finding or the peak, auto
    window/level, the calibrated threshold (unless the reader keeps their own), and the review form."""
    ss = st.session_state
    first = next((k for k in targets if k.startswith("finding-")), None)
    start = first or ("peak" if "peak" in targets else "centre")
    if start in targets:
        _set_position(targets[start][0])
        ss[JUMP] = start
    if vols.input is not None:
        ss[WINDOW], ss[LEVEL] = range_to_window(*vols.input.window)
    calibrated = calibrated_threshold(detail)
    if ss.get(KEEP_THRESHOLD) and THRESHOLD in ss:
        pass  # the reader chose to keep their own threshold from scan to scan
    elif calibrated is not None:
        ss[THRESHOLD] = float(calibrated)
    elif vols.anomaly is not None:
        ss[THRESHOLD] = float(vols.anomaly.p99)
    review.reset(detail)
    ss[LOADED] = detail.result.id


def findings_table(detail: ResultDetail) -> None:
    """The findings of the scan (volume, region, peak, positions), or why there are none."""
    st.markdown(f"#### Findings ({len(detail.findings)})")
    if not detail.findings:
        if detail.run.calibration is None:
            st.caption(
                "No findings: findings are extracted when a run is scored with a calibration "
                "(`anomaly score --calibration NAME`)."
            )
        else:
            st.caption("No finding above the calibrated threshold and minimum size.")
        return
    st.dataframe(
        [
            {
                "#": f.rank,
                "volume (mL)": round(f.volume_ml, 3),
                "region": f.region_majority or f.region_centroid or "unavailable",
                "region at centroid": f.region_centroid or "",
                "peak": round(f.peak, 4),
                "mean": round(f.mean, 4),
                "voxels": f.n_voxels,
                "centroid (mm)": f"{f.centroid_x:.1f}, {f.centroid_y:.1f}, {f.centroid_z:.1f}",
                "peak at (mm)": f"{f.peak_x:.1f}, {f.peak_y:.1f}, {f.peak_z:.1f}",
                "atlas": f.atlas or "",
            }
            for f in detail.findings
        ],
        hide_index=True,
        width="stretch",
    )


def details(detail: ResultDetail, vols: ScanVolumes) -> None:
    """Files, geometry, model, calibration and warnings of the scan, collapsed."""
    result, scan, run = detail.result, detail.scan, detail.run
    with st.expander("Scan and run details"):
        rows = {
            "scan": scan.name,
            "input file": result.input_path,
            "anomaly map": display_path(result.map_path, run.out_dir),
            "reconstruction": display_path(result.recon_path, run.out_dir) or "—",
            "mask": display_path(result.mask_path, run.out_dir) or "—",
            "output folder": run.out_dir,
            "shape / spacing / orientation": f"{scan.shape} / {scan.spacing} / {scan.orientation}",
            "model": _model_line(run.model.name, ResultDetails.from_dict(result.details)),
            "calibration": run.calibration.ref if run.calibration else "none",
            "scoring time (s)": fmt_score(result.timing_s),
            "content hash": scan.content_hash,
        }
        st.table({"": list(rows), "value": [plain(v) for v in rows.values()]})
        for warning in ResultDetails.from_dict(result.details).warnings:
            st.caption(f":material/warning: {plain(warning)}")


def _model_line(name: str, facts: ResultDetails) -> str:
    """The run's model, with the contrast it scored the scan as and the route that did (models routed by contrast)."""
    route = facts.stages.get("model")
    contrast = f"scored as {contrast_label(facts.contrast)}" if facts.contrast else "contrast unknown"
    return f"{name} ({contrast}{'; route ' + str(route) if route else ''})"


def header(detail: ResultDetail, prev_id: int | None, next_id: int | None, run: RunSummary) -> None:
    """Scan title, score, flag and verdict between Previous and Next, then the review progress."""
    result = detail.result
    c1, c2, c3 = st.columns([1, 5, 1], vertical_alignment="center")
    c1.button(
        "Previous",
        icon=":material/arrow_back:",
        key="vw_prev",
        disabled=prev_id is None,
        on_click=_goto,
        args=(prev_id,),
        width="stretch",
    )
    flag = " · :red[**flagged**]" if result.flagged else ""
    verdict = detail.latest_review.verdict if detail.latest_review else "unreviewed"
    c2.markdown(
        f"### {plain(detail.scan.name)}\nscore **{fmt_score(result.score)}**{flag} · {len(detail.findings)} "
        f"finding(s) · {verdict}"
    )
    c3.button(
        "Next",
        icon=":material/arrow_forward:",
        key="vw_next",
        disabled=next_id is None,
        on_click=_goto,
        args=(next_id,),
        width="stretch",
    )
    done, total = run.n_reviewed, run.n_ok  # kept on the run at every write: nothing is counted here
    st.progress(
        done / total if total else 0.0, text=f"Reviewed {done} of {total} scored scans in run {run.run_id}"
    )


def pick_result(store: Store, run: RunSummary) -> ResultDetail | None:
    """The scan to show: the one chosen, else the first of the worklist (its filters and order)."""
    ss = st.session_state
    chosen = state.filters()
    with store.session() as s:
        result_id = ss.get(state.RESULT)
        detail = get_result_detail(s, int(result_id)) if result_id is not None else None
        if detail is not None and detail.run.id == run.run_id:
            return detail
        rows = (result_page(s, run.run_id, **chosen.query(), order=chosen.order, size=1).rows
                or result_page(s, run.run_id, order=chosen.order, size=1).rows)
        if not rows:
            return None
        ss[state.RESULT] = rows[0].result_id
        return get_result_detail(s, rows[0].result_id)


def render(store: Store, run_list: list[RunSummary]) -> None:
    """Draw the viewer for the scan in view."""
    ss = st.session_state
    for key, value in VIEW_DEFAULTS.items():
        ss.setdefault(key, value)
    run = selected_run(run_list)
    if run is None:
        empty_runs()
        return
    detail = pick_result(store, run)
    if detail is None:
        st.info(f"Run {run.run_id} has no results yet.")
        return
    chosen = state.filters()
    stepping = chosen.stepping(bool(ss.get(state.UNREVIEWED_ONLY)))
    with store.session() as s:
        prev_id, next_id = neighbours(s, run.run_id, detail.result.id, chosen.order, **stepping)
    header(detail, prev_id, next_id, run)

    vols = (load_scan(detail, bool(ss.get(SHOW_MASK)), bool(ss.get(SHOW_BRAIN)))
            if detail.result.status == "ok" else ScanVolumes())
    targets = jump_targets(detail, vols)
    if ss.get(LOADED) != detail.result.id:
        init_scan(detail, vols, targets)

    main, side = st.columns([3.3, 1.2], gap="medium")
    with side:
        st.toggle(
            "Next/previous: unreviewed only",
            key=state.UNREVIEWED_ONLY,
            help="Step only through scans without a verdict (within the worklist filters).",
        )
        review.panel(store, run.run_id, detail, chosen.order, stepping)
    with main:
        if detail.result.status != "ok":
            st.error(f"Scoring failed for this scan: {plain(detail.result.error or 'no reason recorded')}")
        for problem in vols.problems:
            st.warning(plain(problem))
        if vols.reference is None:
            if detail.result.status == "ok":
                st.info("No image of this scan can be shown (see above).")
        else:
            toolbar(detail, vols, targets)
            planes(vols)
            display_settings(vols, bool(detail.result.mask_path))
            st.markdown("#### Input · reconstruction · residual")
            compare(vols)
        findings_table(detail)
        if vols.reference is not None:
            view_3d(vols)
        details(detail, vols)
    prefetch_next(store, next_id)

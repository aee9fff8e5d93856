"""Scan viewer: axial, coronal and sagittal slices with sliders and a crosshair that jumps to the peak or
a finding, window/level, the anomaly map as a thresholded colour overlay (calibrated threshold
pre-selected), input | reconstruction | residual side by side, the findings, the review panel, and
an interactive NiiVue view."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import streamlit as st

from anomaly.calibration import Calibration
from anomaly.records import ResultDetails
from anomaly.store import (
    Finding,
    ResultDetail,
    RunSummary,
    Store,
    get_result_detail,
    neighbours,
    review_progress,
    run_results,
)
from anomaly.viz import (
    COLORMAPS,
    PLANE_AXIS,
    PLANES,
    OverlayStyle,
    range_to_window,
    render_map,
    render_plane,
    window_to_range,
)
from dashboard import state
from dashboard.paths import UnsafePathError, display_path, result_file
from dashboard.text import plain
from dashboard.views import review
from dashboard.views.common import empty_runs, fmt_score, selected_run
from dashboard.volumes import LoadedVolume, VolumeLoadError, load_many, prefetch

X, Y, Z = "vw_x", "vw_y", "vw_z"
AXIS_KEYS = (X, Y, Z)
WINDOW, LEVEL = "vw_window", "vw_level"
THRESHOLD, CMAP, OPACITY = "vw_threshold", "vw_cmap", "vw_opacity"
SHOW_OVERLAY, SHOW_MASK, SHOW_BRAIN = "vw_overlay", "vw_mask_outline", "vw_brain_outline"
KEEP_THRESHOLD = "vw_keep_threshold"
JUMP, PLANE = "vw_jump", "vw_plane"
SHOW_3D, LAYOUT_3D = "vw_3d", "vw_3d_layout"
LOADED = "vw_loaded"
IMAGE_SIZE = 340
SLIDER_STEPS = 400

PERSISTENT_KEYS: tuple[str, ...] = (
    X,
    Y,
    Z,
    WINDOW,
    LEVEL,
    THRESHOLD,
    CMAP,
    OPACITY,
    SHOW_OVERLAY,
    SHOW_MASK,
    KEEP_THRESHOLD,
    JUMP,
    PLANE,
    SHOW_3D,
    LAYOUT_3D,
)
"""Widget keys kept while other pages are shown, so the viewer reopens as it was left."""

VIEW_DEFAULTS: dict[str, Any] = {
    CMAP: "hot",
    OPACITY: 0.6,
    SHOW_OVERLAY: True,
    SHOW_MASK: False,
    SHOW_BRAIN: True,
    KEEP_THRESHOLD: False,
    PLANE: "axial",
    SHOW_3D: False,
    LAYOUT_3D: "multiplanar",
}


@dataclass
class ScanVolumes:
    """The files of one result as loaded volumes (any may be missing) and why some could not be shown."""

    input: LoadedVolume | None = None
    anomaly: LoadedVolume | None = None
    recon: LoadedVolume | None = None
    mask: LoadedVolume | None = None
    brain: LoadedVolume | None = None
    sources: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def reference(self) -> LoadedVolume | None:
        """The volume that fixes the grid: the map, else the input, else the reconstruction."""
        return self.anomaly or self.input or self.recon


def load_scan(detail: ResultDetail, with_mask: bool = False, with_brain: bool = False) -> ScanVolumes:
    """Open the result's recorded files through the path checks (in parallel; the stored mask and the
    brain mask only when their outlines are asked for); every refusal or failure is kept as a message."""
    out = ScanVolumes()
    wanted: list[tuple[str, Path]] = []
    kinds = ["anomaly", "input", "recon"] + (["mask"] if with_mask else []) + (["brain"] if with_brain else [])
    for kind in kinds:
        try:
            path = result_file(detail.result, detail.out_dir, kind)
        except UnsafePathError as exc:
            out.problems.append(str(exc))
            continue
        if path is not None and (kind != "brain" or path.is_file()):  # runs may predate brain masks
            wanted.append((kind, path))
    for (kind, path), loaded in zip(wanted, load_many([p for _, p in wanted]), strict=True):
        if isinstance(loaded, VolumeLoadError):
            out.problems.append(str(loaded))
            continue
        reference = out.reference
        if reference is not None and loaded.volume.shape != reference.volume.shape:
            out.problems.append(
                f"{kind} file {display_path(path, detail.out_dir)} has shape {loaded.volume.shape}, "
                f"unlike the map's {reference.volume.shape}; it is not shown"
            )
            continue
        setattr(out, kind, loaded)
        stat = path.stat()
        out.sources[kind] = f"{path}|{stat.st_mtime_ns}|{stat.st_size}"
    return out


def prefetch_next(store: Store, result_id: int | None) -> None:
    """Start reading the next scan's files in the background so that Next and Save & next are instant."""
    if result_id is None:
        return
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


def calibrated_threshold(detail: ResultDetail) -> float | None:
    """The voxel threshold of the run's calibration, when the run has one."""
    calibration = detail.run.calibration
    return None if calibration is None else Calibration.from_stored(calibration).voxel_threshold


def finding_label(f: Finding) -> str:
    """How a finding is named in the crosshair picker."""
    region = f.region_majority or f.region_centroid or "region unavailable"
    return f"finding {f.rank}: {f.volume_ml:.2f} mL, {region}, peak {f.peak:.3g}"


def jump_targets(detail: ResultDetail, vols: ScanVolumes) -> dict[str, tuple[tuple[int, int, int], str]]:
    """Crosshair targets by key: the map's peak, each finding's peak voxel, the centre."""
    reference = vols.reference
    if reference is None:
        return {}
    volume = reference.volume
    targets: dict[str, tuple[tuple[int, int, int], str]] = {}
    if vols.anomaly is not None:
        targets["peak"] = (vols.anomaly.volume.peak_voxel(), "peak of the anomaly map")
    for f in detail.findings:
        targets[f"finding-{f.id}"] = (volume.world_to_voxel((f.peak_x, f.peak_y, f.peak_z)), finding_label(f))
    targets["centre"] = (volume.center_voxel(), "centre of the volume")
    return targets


def _set_position(ijk: tuple[int, int, int]) -> None:
    for key, value in zip(AXIS_KEYS, ijk, strict=True):
        st.session_state[key] = int(value)


def _jump(targets: dict[str, tuple[tuple[int, int, int], str]]) -> None:
    target = targets.get(st.session_state.get(JUMP, ""))
    if target is not None:
        _set_position(target[0])


def _goto(result_id: int) -> None:
    st.session_state[state.RESULT] = result_id


def _nice_step(span: float) -> float:
    raw = max(span, 1e-9) / SLIDER_STEPS
    magnitude = 10 ** int(f"{raw:e}".split("e")[1])
    for factor in (1, 2, 5, 10):
        if raw <= factor * magnitude:
            return float(factor * magnitude)
    return float(10 * magnitude)


def _slider_top(vols: ScanVolumes, calibrated: float | None) -> float:
    top = vols.anomaly.vmax if vols.anomaly is not None else 1.0
    if calibrated is not None:
        top = max(top, calibrated * 1.05)
    return top if top > 0 else 1.0


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


def _clamp(key: str, low: float, high: float) -> None:
    ss = st.session_state
    value = ss.get(key, low)
    ss[key] = type(low)(min(max(value, low), high))


def toolbar(detail: ResultDetail, vols: ScanVolumes, targets: dict[str, Any]) -> None:
    """Crosshair jump, overlay threshold, opacity, colour map and overlay switch above the planes."""
    ss = st.session_state
    c = st.columns([1.9, 0.9, 2.1, 1.2, 1.0, 1.1], vertical_alignment="bottom")
    if targets:
        if ss.get(JUMP) not in targets:
            ss[JUMP] = next(iter(targets))
        c[0].selectbox(
            "Crosshair to",
            list(targets),
            key=JUMP,
            format_func=lambda k: targets[k][1],
            on_change=_jump,
            args=(targets,),
        )
        c[1].button(
            "Jump",
            on_click=_jump,
            args=(targets,),
            key="vw_jump_button",
            width="stretch",
            help="Move the crosshair to the chosen target again.",
        )
    if vols.anomaly is None:
        return
    calibrated = calibrated_threshold(detail)
    top = _slider_top(vols, calibrated)
    _clamp(THRESHOLD, 0.0, top)
    c[2].slider(
        "Overlay threshold",
        0.0,
        top,
        key=THRESHOLD,
        step=_nice_step(top),
        format="%.4g",
        help="Voxels at or above this value are coloured."
        + (
            f" Pre-set to the calibrated voxel threshold {calibrated:.4g} of {detail.run.calibration.ref}."
            if calibrated is not None and detail.run.calibration
            else " The run has no calibration; the default is the map's 99th percentile."
        ),
    )
    c[3].slider("Opacity", 0.0, 1.0, key=OPACITY, step=0.05)
    c[4].selectbox("Colour map", COLORMAPS, key=CMAP)
    c[5].toggle("Overlay", key=SHOW_OVERLAY)
    c[5].toggle("Keep threshold", key=KEEP_THRESHOLD,
                help="Keep this threshold when the next scan opens (off: each scan opens at the calibrated one).")


def display_settings(vols: ScanVolumes, has_mask: bool) -> None:
    """Window/level of the input, the brain-mask outline and the stored-mask outline, in a collapsed section."""
    if vols.input is None and not has_mask:
        return
    with st.expander("Window / level and mask outline"):
        c1, c2, c3 = st.columns([2, 2, 1], vertical_alignment="bottom")
        if vols.input is not None:
            low, high = vols.input.vmin, vols.input.vmax
            span = max(high - low, 1e-6)
            _clamp(WINDOW, span / SLIDER_STEPS, span)
            _clamp(LEVEL, low, high)
            c1.slider("Window", span / SLIDER_STEPS, span, key=WINDOW, step=_nice_step(span), format="%.4g")
            c2.slider("Level", low, high, key=LEVEL, step=_nice_step(span), format="%.4g")
            c3.button(
                "Auto",
                key="vw_auto_window",
                on_click=_auto_window,
                args=(vols.input.window,),
                help="Back to the 1st-99.5th percentile window.",
            )
        st.toggle(
            "Outline the brain mask",
            key=SHOW_BRAIN,
            help="The brain mask scoring used (<name>_brain.nii.gz: brain extraction or the given mask, eroded "
                 "by the scoring rim), in orange.",
        )
        if has_mask:
            st.toggle(
                "Outline the stored calibrated mask",
                key=SHOW_MASK,
                help="The mask scoring wrote with the run's calibration (not the threshold chosen here).",
            )


def _auto_window(window: tuple[float, float]) -> None:
    st.session_state[WINDOW], st.session_state[LEVEL] = range_to_window(*window)


def _style(vols: ScanVolumes) -> OverlayStyle | None:
    ss = st.session_state
    if vols.anomaly is None or not ss.get(SHOW_OVERLAY, True):
        return None
    return OverlayStyle(
        threshold=float(ss[THRESHOLD]),
        vmax=max(vols.anomaly.vmax, float(ss[THRESHOLD]) + 1e-6),
        cmap=ss.get(CMAP, "hot"),
        opacity=float(ss.get(OPACITY, 0.6)),
    )


def planes(vols: ScanVolumes) -> None:
    """The three orthogonal planes with the overlay and crosshair, each with its slice slider."""
    ss = st.session_state
    reference = vols.reference
    assert reference is not None
    shape = reference.volume.shape
    for key, n in zip(AXIS_KEYS, shape, strict=True):
        _clamp(key, 0, n - 1)
    position = (ss[X], ss[Y], ss[Z])
    base = vols.input or vols.recon
    style = _style(vols)
    columns = st.columns(3)
    for plane, column in zip(PLANES, columns, strict=True):
        axis = PLANE_AXIS[plane]
        key = AXIS_KEYS[axis]
        index = int(ss[key])
        if base is not None:
            window = window_to_range(ss[WINDOW], ss[LEVEL]) if base is vols.input else base.window
            picture = render_plane(
                base.volume,
                plane,
                index,
                window=window,
                overlay_map=vols.anomaly.volume if style is not None and vols.anomaly else None,
                style=style,
                mask=vols.mask.volume if vols.mask and ss.get(SHOW_MASK) else None,
                brain=vols.brain.volume if vols.brain and ss.get(SHOW_BRAIN) else None,
                crosshair=position,
                target=IMAGE_SIZE,
            )
        else:
            assert vols.anomaly is not None
            picture = render_map(
                vols.anomaly.volume,
                plane,
                index,
                vmin=0.0,
                vmax=vols.anomaly.vmax,
                cmap=ss.get(CMAP, "hot"),
                threshold=float(ss[THRESHOLD]),
                crosshair=position,
                target=IMAGE_SIZE,
            )
        column.image(picture, caption=f"{plane} · slice {index + 1} of {shape[axis]}", width="stretch")
        column.slider(f"{plane} slice", 0, shape[axis] - 1, key=key, label_visibility="collapsed")


def residual_top(values: LoadedVolume, threshold: float) -> float:
    """Top of the residual's colour scale: the map's maximum, but at least twice the threshold, so that
    the noise of a normal scan stays dark instead of being stretched to full colour."""
    return max(values.vmax, 2.0 * threshold, 1e-6)


def compare(vols: ScanVolumes) -> None:
    """Input, reconstruction and residual (the anomaly map) side by side in one plane."""
    ss = st.session_state
    reference = vols.reference
    assert reference is not None
    if ss.get(PLANE) not in PLANES:
        ss[PLANE] = "axial"
    st.segmented_control("Compare in plane", PLANES, key=PLANE, selection_mode="single")
    plane = ss.get(PLANE) or "axial"
    axis = PLANE_AXIS[plane]
    index = int(ss[AXIS_KEYS[axis]])
    position = (ss[X], ss[Y], ss[Z])
    c1, c2, c3 = st.columns(3)
    if vols.input is not None:
        window = window_to_range(ss[WINDOW], ss[LEVEL])
        c1.image(
            render_plane(
                vols.input.volume, plane, index, window=window, crosshair=position, target=IMAGE_SIZE
            ),
            caption="input",
            width="stretch",
        )
    else:
        c1.info("Input not available.")
    if vols.recon is not None:
        c2.image(
            render_plane(
                vols.recon.volume,
                plane,
                index,
                window=vols.recon.window,
                crosshair=position,
                target=IMAGE_SIZE,
            ),
            caption="reconstruction",
            width="stretch",
        )
    else:
        c2.info("No reconstruction was saved for this scan.")
    if vols.anomaly is not None:
        top = residual_top(vols.anomaly, float(ss[THRESHOLD]))
        c3.image(
            render_map(
                vols.anomaly.volume,
                plane,
                index,
                vmin=0.0,
                vmax=top,
                cmap=ss.get(CMAP, "hot"),
                threshold=float(ss[THRESHOLD]),
                crosshair=position,
                target=IMAGE_SIZE,
            ),
            caption=f"residual (anomaly map, colours 0 to {top:.3g}; outline at the threshold)",
            width="stretch",
        )
    else:
        c3.info("No anomaly map for this scan.")


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


def view_3d(vols: ScanVolumes) -> None:
    """The NiiVue multiplanar/3D view, drawn only when switched on (it sends the volumes to the browser)."""
    from dashboard.niivue_view import LAYOUTS, layer, niivue_view

    ss = st.session_state
    c1, c2 = st.columns([1, 2], vertical_alignment="bottom")
    c1.toggle("Interactive 3D view (NiiVue)", key=SHOW_3D)
    if not ss.get(SHOW_3D):
        return
    if ss.get(LAYOUT_3D) not in LAYOUTS:
        ss[LAYOUT_3D] = LAYOUTS[0]
    c2.segmented_control("Layout", LAYOUTS, key=LAYOUT_3D, selection_mode="single")
    layers = []
    if vols.input is not None:
        low, high = window_to_range(ss[WINDOW], ss[LEVEL])
        layers.append(
            layer(
                vols.sources["input"],
                "input.nii.gz",
                vols.input.volume,
                low=vols.input.vmin,
                high=vols.input.vmax,
                colormap="gray",
                cal_min=low,
                cal_max=high,
            )
        )
    if vols.anomaly is not None:
        layers.append(
            layer(
                vols.sources["anomaly"],
                "anomaly.nii.gz",
                vols.anomaly.volume,
                low=0.0,
                high=max(vols.anomaly.vmax, 1e-6),
                colormap=ss.get(CMAP, "hot"),
                cal_min=float(ss[THRESHOLD]),
                cal_max=max(vols.anomaly.vmax, float(ss[THRESHOLD]) + 1e-6),
                opacity=float(ss.get(OPACITY, 0.6)) if ss.get(SHOW_OVERLAY, True) else 0.0,
            )
        )
    reference = vols.reference
    assert reference is not None
    crosshair = reference.volume.voxel_to_world((ss[X], ss[Y], ss[Z]))
    niivue_view(layers, crosshair_mm=crosshair, layout=ss.get(LAYOUT_3D) or LAYOUTS[0])
    st.caption("Drag to rotate the 3D render, click a slice to move the crosshair, scroll to change slices.")


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
            "model": run.model.name,
            "calibration": run.calibration.ref if run.calibration else "none",
            "scoring time (s)": fmt_score(result.timing_s),
            "content hash": scan.content_hash,
        }
        st.table({"": list(rows), "value": [plain(v) for v in rows.values()]})
        for warning in ResultDetails.from_dict(result.details).warnings:
            st.caption(f":material/warning: {plain(warning)}")


def header(detail: ResultDetail, prev_id: int | None, next_id: int | None, store: Store, run_id: int) -> None:
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
    with store.session() as s:
        done, total = review_progress(s, run_id)
    st.progress(
        done / total if total else 0.0, text=f"Reviewed {done} of {total} scored scans in run {run_id}"
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
        rows = run_results(s, run.run_id, **chosen.query(), order=chosen.order, limit=1) or run_results(
            s, run.run_id, order=chosen.order, limit=1
        )
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
    header(detail, prev_id, next_id, store, run.run_id)

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

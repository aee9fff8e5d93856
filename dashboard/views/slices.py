"""The pictures of the viewer: three planes with sliders and the map overlay, input | reconstruction |
residual side by side, the crosshair, threshold, window/level and overlay controls, and the NiiVue view.
Their widget keys live here; the page around them is :mod:`dashboard.views.viewer`."""

from __future__ import annotations

from typing import Any

import streamlit as st

from anomaly.calibration import Calibration
from anomaly.store import ResultDetail
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
from dashboard.scan_files import ScanVolumes
from dashboard.volumes import LoadedVolume

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


def calibrated_threshold(detail: ResultDetail) -> float | None:
    """The voxel threshold of the run's calibration, when the run has one."""
    calibration = detail.run.calibration
    return None if calibration is None else Calibration.from_stored(calibration).voxel_threshold


def _set_position(ijk: tuple[int, int, int]) -> None:
    for key, value in zip(AXIS_KEYS, ijk, strict=True):
        st.session_state[key] = int(value)


def _jump(targets: dict[str, tuple[tuple[int, int, int], str]]) -> None:
    target = targets.get(st.session_state.get(JUMP, ""))
    if target is not None:
        _set_position(target[0])


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

"""The offline HTML report of one subject: per image its scan score, flag, findings table and a few
slices with the anomaly map overlaid, as one self-contained file (inline CSS, PNGs as data URIs, no
script, no network) that any browser opens from disk, like fMRIPrep's and MRIQC's subject reports."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
from nibabel.spatialimages import SpatialImage

from anomaly.viz import OverlayStyle, auto_window, render_plane, to_canonical, to_png

FINDING_COLUMNS: tuple[tuple[str, str], ...] = (
    ("rank", "#"), ("volume_ml", "volume (mL)"), ("peak", "peak"), ("mean", "mean"),
    ("centroid", "centroid x, y, z (mm)"), ("region_centroid", "region"),
)


@dataclass
class ReportImage:
    """What the report shows about one scored (or failed) image."""

    name: str
    status: str = "ok"
    error: str | None = None
    score: float | None = None
    flagged: bool | None = None
    contrast: str | None = None
    calibration: dict[str, Any] | None = None
    findings: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    input_path: Path | None = None
    map_path: Path | None = None
    mask_path: Path | None = None
    brain_path: Path | None = None


def _load(path: Path | None) -> tuple[np.ndarray, np.ndarray] | None:
    if path is None or not Path(path).is_file():
        return None
    image = cast(SpatialImage, nib.load(str(path)))
    return np.asarray(image.dataobj, dtype=np.float32).reshape(image.shape[:3]), image.affine


def slice_pictures(image: ReportImage, target: int = 260) -> list[tuple[str, bytes]]:
    """PNG pictures through the map's peak: axial, coronal and sagittal, plus two more axial slices,
    the input in grey with the map in colour above its threshold and the findings mask outlined."""
    base, amap = _load(image.input_path), _load(image.map_path)
    if base is None or amap is None or base[0].shape != amap[0].shape:
        return []
    canon = to_canonical(*base)
    cmap = to_canonical(*amap)
    brain = _load(image.brain_path)
    inside = to_canonical(*brain).data > 0 if brain is not None and brain[0].shape == base[0].shape else cmap.data > 0
    values = cmap.data[inside & np.isfinite(cmap.data)]
    if values.size == 0:
        return []
    cal = image.calibration or {}
    threshold = float(cal["voxel_threshold"]) if cal.get("voxel_threshold") is not None else float(
        np.percentile(values, 99.0))
    vmax = max(float(np.percentile(values, 99.9)), threshold + 1e-6)
    style = OverlayStyle(threshold=threshold, vmax=vmax, cmap="hot", opacity=0.65)
    mask = _load(image.mask_path)
    outline = to_canonical(*mask) if mask is not None and mask[0].shape == base[0].shape else None
    masked = np.where(inside, np.nan_to_num(cmap.data, nan=-np.inf), -np.inf)
    peak = np.unravel_index(int(np.argmax(masked)), masked.shape)
    window = auto_window(canon.data)
    zs = np.flatnonzero(inside.any(axis=(0, 1)))
    lo, hi = (int(zs[0]), int(zs[-1])) if zs.size else (0, canon.shape[2] - 1)
    planes = [("axial", 2, int(peak[2]), "axial through the peak"),
              ("coronal", 1, int(peak[1]), "coronal through the peak"),
              ("sagittal", 0, int(peak[0]), "sagittal through the peak"),
              ("axial", 2, lo + (hi - lo) // 3, "axial, lower third"),
              ("axial", 2, lo + 2 * (hi - lo) // 3, "axial, upper third")]
    pictures = []
    for plane, _axis, index, caption in planes:
        rgb = render_plane(canon, plane, index, window=window, overlay_map=cmap, style=style, mask=outline,
                           target=target)
        pictures.append((f"{caption} (slice {index})", to_png(rgb)))
    return pictures


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;color:#222;max-width:1400px}
h1{font-size:1.6em} h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ccc;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0} td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f2f2f2} td.l,th.l{text-align:left}
.flag{color:#fff;background:#c0392b;padding:.1em .5em;border-radius:.3em}
.ok{color:#fff;background:#27ae60;padding:.1em .5em;border-radius:.3em}
.fail{color:#fff;background:#7f8c8d;padding:.1em .5em;border-radius:.3em}
figure{display:inline-block;margin:.3em;text-align:center} figcaption{font-size:.8em;color:#555}
.warn{color:#8a6d3b} .small{font-size:.85em;color:#555}
"""


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return html.escape(str(value))


def _findings_table(findings: Sequence[dict[str, Any]]) -> str:
    if not findings:
        return "<p class='small'>No findings above the calibrated threshold.</p>"
    head = "".join(f"<th{' class=l' if key == 'region_centroid' else ''}>{html.escape(label)}</th>"
                   for key, label in FINDING_COLUMNS)
    rows = []
    for f in findings:
        cells = []
        for key, _ in FINDING_COLUMNS:
            if key == "centroid":
                xyz = [f.get(f"centroid_{a}") for a in "xyz"]
                cells.append("<td>" + ", ".join(f"{v:.1f}" if isinstance(v, (int, float)) else "–" for v in xyz)
                             + "</td>")
            elif key == "region_centroid":
                cells.append(f"<td class=l>{_fmt(f.get(key))}</td>")
            else:
                cells.append(f"<td>{_fmt(f.get(key))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _badge(image: ReportImage) -> str:
    if image.status != "ok":
        return "<span class=fail>failed</span>"
    if image.flagged:
        return "<span class=flag>flagged</span>"
    if image.flagged is False:
        return "<span class=ok>not flagged</span>"
    return "<span class=small>no scan threshold</span>"


def render_subject_report(subject: str, images: Sequence[ReportImage], *, about: dict[str, Any] | None = None,
                          pictures: bool = True) -> str:
    """The whole HTML document of one subject's report."""
    about = about or {}
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>sub-{html.escape(subject)}: "
             f"anomaly report</title><style>{_CSS}</style></head><body>",
             f"<h1>Anomaly report: sub-{html.escape(subject)}</h1>"]
    if about:
        parts.append("<table>" + "".join(f"<tr><th class=l>{html.escape(str(k))}</th><td class=l>{_fmt(v)}</td></tr>"
                                         for k, v in about.items()) + "</table>")
    parts.append("<p class=small>Research software, not a medical device: a map shows where a scan differs from "
                 "what the model learned as normal, not a diagnosis.</p>")
    summary = ["<table><tr><th class=l>image</th><th class=l>contrast</th><th>scan score</th><th class=l>flag</th>"
               "<th>findings</th></tr>"]
    for image in images:
        summary.append(f"<tr><td class=l><a href='#{html.escape(image.name)}'>{html.escape(image.name)}</a></td>"
                       f"<td class=l>{_fmt(image.contrast)}</td><td>{_fmt(image.score)}</td>"
                       f"<td class=l>{_badge(image)}</td><td>{len(image.findings)}</td></tr>")
    parts.append("".join(summary) + "</table>")
    for image in images:
        parts.append(f"<h2 id='{html.escape(image.name)}'>{html.escape(image.name)} {_badge(image)}</h2>")
        if image.status != "ok":
            parts.append(f"<p>{_fmt(image.error)}</p>")
            continue
        cal = image.calibration or {}
        parts.append(f"<p>scan score <b>{_fmt(image.score)}</b>; contrast {_fmt(image.contrast)}; calibration "
                     f"{_fmt(cal.get('name'))} (voxel threshold {_fmt(cal.get('voxel_threshold'))}, scan threshold "
                     f"{_fmt(cal.get('scan_threshold'))})</p>")
        for warning in image.warnings:
            parts.append(f"<p class=warn>warning: {html.escape(warning)}</p>")
        if image.calibration:
            parts.append(_findings_table(image.findings))
        else:
            parts.append("<p class=small>No calibration applied: no findings mask (score with --calibration).</p>")
        if pictures:
            for caption, png in slice_pictures(image):
                data = base64.b64encode(png).decode("ascii")
                parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                             f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)

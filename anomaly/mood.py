"""Export in the MOOD challenge (Medical Out-of-Distribution Analysis) submission layout.

``out_dir/pixel/<name>.nii.gz``: the voxel map, float32, on the input's grid and affine, values in
[0, 1]; ``out_dir/sample/<name>.nii.gz.txt``: one number in [0, 1], the scan score. The challenge
scores both with average precision, so only the order of values matters: each kind is rescaled by
one affine map shared by all exported scans, ``(x - lo) / (hi - lo)``, which never reverses an order.
By default ``lo``/``hi`` are the minimum and maximum over everything exported (a strictly increasing
map, so every ranking within and across scans holds, up to float32 rounding); a given range, for
instance ``(0, 2 * calibrated threshold)``, clips values outside it to 0 or 1, which ties them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomaly.volume import save_nifti, scan_name


@dataclass(frozen=True)
class MoodItem:
    """One scan to export: its name (file name without ``.nii.gz`` is fine), map, affine and score."""

    name: str
    map: np.ndarray
    affine: np.ndarray
    score: float


def _range(values: Iterable[tuple[float, float]], given: tuple[float, float] | None, what: str) -> tuple[float, float]:
    if given is not None:
        lo, hi = float(given[0]), float(given[1])
        if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
            raise ValueError(f"export_mood: {what} range {given!r} must be two finite numbers with lo < hi")
        return lo, hi
    pairs = list(values)
    return min(p[0] for p in pairs), max(p[1] for p in pairs)


def _rescale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:  # everything equal: no order to keep
        return np.zeros(np.shape(values), dtype=np.float32)
    out = (np.asarray(values, dtype=np.float64) - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _file_stem(name: str) -> str:
    stem = scan_name(name)
    if not stem or stem in {".", ".."} or "/" in name or "\\" in name:
        raise ValueError(f"export_mood: scan name {name!r} is not a plain file name; pass the name without folders")
    return stem


def export_mood(items: Iterable[MoodItem], out_dir: str | os.PathLike[str], *,
                pixel_range: tuple[float, float] | None = None,
                sample_range: tuple[float, float] | None = None) -> dict[str, dict[str, Path]]:
    """Write every item's pixel map and sample score; returns ``{name: {"pixel": path, "sample": path}}``.

    Without ``pixel_range``/``sample_range`` the global minimum and maximum are used (see the module
    docstring); the items are then read twice, so pass a sequence, not a one-shot iterator.
    """
    items = list(items)
    if not items:
        raise ValueError("export_mood: nothing to export; pass at least one scored scan")
    stems = [_file_stem(item.name) for item in items]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise ValueError(f"export_mood: scan names {duplicates} occur more than once; names must be unique")
    for item, stem in zip(items, stems, strict=True):
        if np.asarray(item.map).ndim != 3:
            raise ValueError(f"export_mood: map of {stem!r} has shape {np.shape(item.map)}; a 3D map is needed")
        if not np.isfinite(item.map).all() or not np.isfinite(item.score):
            raise ValueError(f"export_mood: map or score of {stem!r} holds NaN or infinite values")
    lo, hi = _range(((float(np.min(i.map)), float(np.max(i.map))) for i in items), pixel_range, "pixel")
    scores = np.array([float(i.score) for i in items])
    s_lo, s_hi = _range([(float(scores.min()), float(scores.max()))], sample_range, "sample")
    sample_values = _rescale(scores, s_lo, s_hi)

    out = Path(out_dir)
    (out / "pixel").mkdir(parents=True, exist_ok=True)
    (out / "sample").mkdir(parents=True, exist_ok=True)
    written: dict[str, dict[str, Path]] = {}
    for item, stem, value in zip(items, stems, sample_values, strict=True):
        pixel = save_nifti(_rescale(item.map, lo, hi), item.affine, out / "pixel" / f"{stem}.nii.gz")
        sample = out / "sample" / f"{stem}.nii.gz.txt"
        tmp = sample.with_name(f".{sample.name}.tmp")
        tmp.write_text(f"{float(value):.9g}\n", encoding="utf-8")
        os.replace(tmp, sample)
        written[stem] = {"pixel": pixel, "sample": sample}
    return written

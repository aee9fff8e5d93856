"""Slice rendering for review and reports: canonical (RAS) orientation, window/level, colour-mapped
overlays with opacity and threshold, mask outlines and crosshairs, as RGB ``uint8`` arrays or PNG bytes.

Display convention: every plane is drawn as seen from the patient's feet/front/left side in the
neurological convention (the patient's left on the left of the picture), superior or anterior at the
top; voxel sizes are respected so that anisotropic volumes keep their shape.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")
"""Planes in display order; each is perpendicular to one axis of the canonical RAS volume."""

PLANE_AXIS: dict[str, int] = {"sagittal": 0, "coronal": 1, "axial": 2}
"""The canonical (RAS) axis each plane cuts across."""

COLORMAPS: tuple[str, ...] = ("hot", "inferno", "magma", "viridis", "plasma", "jet", "cool")
"""Overlay colour maps offered to users (matplotlib names)."""

Color = tuple[int, int, int]


# --------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class CanonicalVolume:
    """A 3D array reordered to RAS+ voxel axes with its affine, so planes and crosshairs are uniform."""

    data: np.ndarray
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxels along the canonical axes."""
        return tuple(int(s) for s in self.data.shape[:3])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the canonical axes."""
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]

    def world_to_voxel(self, xyz: Sequence[float]) -> tuple[int, int, int]:
        """Nearest voxel index of a world point in mm, clipped into the volume."""
        ijk = np.linalg.solve(self.affine, np.array([*map(float, xyz), 1.0]))[:3]
        upper = np.array(self.shape) - 1
        return tuple(int(v) for v in np.clip(np.rint(ijk), 0, upper))  # type: ignore[return-value]

    def voxel_to_world(self, ijk: Sequence[int]) -> tuple[float, float, float]:
        """World coordinates in mm of a voxel index."""
        xyz = self.affine @ np.array([*map(float, ijk), 1.0])
        return tuple(float(v) for v in xyz[:3])  # type: ignore[return-value]

    def peak_voxel(self) -> tuple[int, int, int]:
        """Index of the largest value (the first one on ties, in memory order); NaN is skipped; the centre
        when all are NaN."""
        data = self.data
        view = data.T if data.flags.f_contiguous else data  # C-ordered either way: one pass, no copy
        if view.flags.c_contiguous and view.size:
            index = int(np.argmax(view))
            if not np.isnan(view.flat[index]):  # argmax stops at the first NaN: then the slow way below
                ijk = np.unravel_index(index, view.shape)
                return tuple(int(v) for v in (ijk[::-1] if view is not data else ijk))  # type: ignore[return-value]
        flat = np.nan_to_num(data, nan=-np.inf, posinf=np.inf, neginf=-np.inf)
        if not np.isfinite(flat).any():
            return tuple(s // 2 for s in self.shape)  # type: ignore[return-value]
        return tuple(int(v) for v in np.unravel_index(int(np.argmax(flat)), flat.shape))  # type: ignore[return-value]

    def center_voxel(self) -> tuple[int, int, int]:
        """Index of the central voxel."""
        return tuple(s // 2 for s in self.shape)  # type: ignore[return-value]


def to_canonical(data: np.ndarray, affine: np.ndarray) -> CanonicalVolume:
    """Reorder a 3D array (any orientation) to RAS+ axes without resampling; the result is a read-only
    view (flips and axis swaps, no copy: a NIfTI file's Fortran-ordered array stays as it is)."""
    import nibabel as nib

    array = np.asarray(data)
    if array.ndim > 3:
        array = array.reshape(array.shape[:3])
    if array.ndim != 3:
        raise ValueError(f"to_canonical: expected a 3D array, got shape {array.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    ornt = nib.orientations.io_orientation(affine)
    target = nib.orientations.axcodes2ornt(("R", "A", "S"))
    transform = nib.orientations.ornt_transform(ornt, target)
    if np.array_equal(transform, target):  # already RAS+: no copy
        out, new_affine = array, affine
    else:
        out = nib.orientations.apply_orientation(array, transform)
        new_affine = affine @ nib.orientations.inv_ornt_aff(transform, array.shape)
    out = out.view()
    out.flags.writeable = False
    return CanonicalVolume(out, new_affine)


def _check_plane(plane: str) -> int:
    if plane not in PLANE_AXIS:
        raise ValueError(f"unknown plane {plane!r}; use one of {PLANES}")
    return PLANE_AXIS[plane]


def extract_slice(data: np.ndarray, plane: str, index: int) -> np.ndarray:
    """The 2D picture of ``plane`` at ``index`` of a canonical (RAS) array, top row first.

    axial: rows anterior to posterior, columns left to right; coronal and sagittal: rows superior to
    inferior, columns left to right and posterior to anterior.
    """
    axis = _check_plane(plane)
    n = data.shape[axis]
    if not 0 <= index < n:
        raise IndexError(f"{plane} slice {index} is outside 0..{n - 1}")
    if axis == 2:
        picture = data[:, :, index]
    elif axis == 1:
        picture = data[:, index, :]
    else:
        picture = data[index, :, :]
    return picture.T[::-1]


def slice_shape(shape: Sequence[int], plane: str) -> tuple[int, int]:
    """(rows, columns) of the picture ``extract_slice`` returns for a volume of ``shape``."""
    axis = _check_plane(plane)
    rest = [int(s) for i, s in enumerate(shape[:3]) if i != axis]
    return rest[1], rest[0]


def pixel_spacing(spacing: Sequence[float], plane: str) -> tuple[float, float]:
    """(row, column) pixel size in mm of a plane's picture."""
    axis = _check_plane(plane)
    rest = [float(s) for i, s in enumerate(spacing[:3]) if i != axis]
    return rest[1], rest[0]


def voxel_to_pixel(ijk: Sequence[int], shape: Sequence[int], plane: str) -> tuple[int, int]:
    """(row, column) in a plane's picture of the canonical voxel ``ijk``."""
    axis = _check_plane(plane)
    rest = [int(v) for i, v in enumerate(ijk[:3]) if i != axis]
    n_rows = [int(s) for i, s in enumerate(shape[:3]) if i != axis][1]
    return n_rows - 1 - rest[1], rest[0]


# --------------------------------------------------------------------------------------------- intensity


def auto_window(
    data: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.5), max_samples: int = 400_000
) -> tuple[float, float]:
    """(low, high) display range from percentiles of the non-zero finite voxels (sampled for speed)."""
    flat = np.asarray(data).reshape(-1)
    if flat.size > max_samples:
        flat = flat[:: int(np.ceil(flat.size / max_samples))]
    values = flat[np.isfinite(flat) & (flat != 0)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(values, percentiles))
    if high <= low:
        low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + 1.0
    return low, high


def window_to_range(window: float, level: float) -> tuple[float, float]:
    """Window width and level (centre) to a (low, high) display range."""
    width = max(float(window), 1e-12)
    return float(level) - width / 2.0, float(level) + width / 2.0


def range_to_window(low: float, high: float) -> tuple[float, float]:
    """(low, high) display range to window width and level (centre)."""
    return float(high) - float(low), (float(high) + float(low)) / 2.0


def apply_window(picture: np.ndarray, low: float, high: float) -> np.ndarray:
    """Grey values 0..255: ``low`` and below black, ``high`` and above white, NaN black."""
    span = max(float(high) - float(low), 1e-12)
    scaled = (np.asarray(picture, dtype=np.float32) - float(low)) * (255.0 / span)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """A (H, W) uint8 picture as (H, W, 3)."""
    return np.repeat(np.asarray(gray, dtype=np.uint8)[..., None], 3, axis=2)


# --------------------------------------------------------------------------------------------- colour


_HOT_STOPS = np.array([[0.0, 0, 0, 0], [0.365, 255, 0, 0], [0.746, 255, 255, 0], [1.0, 255, 255, 255]])


@lru_cache(maxsize=32)
def colormap_lut(name: str) -> np.ndarray:
    """A (256, 3) uint8 lookup table of a matplotlib colour map (``hot`` works without matplotlib)."""
    try:
        import matplotlib

        cmap = matplotlib.colormaps[name]
    except ImportError:
        if name != "hot":
            raise ValueError(
                f"colour map {name!r} needs matplotlib (pip install matplotlib); 'hot' works without it"
            ) from None
        x = np.linspace(0, 1, 256)
        lut = np.stack([np.interp(x, _HOT_STOPS[:, 0], _HOT_STOPS[:, c]) for c in (1, 2, 3)], axis=1)
        return lut.round().astype(np.uint8)
    except KeyError:
        raise ValueError(f"unknown colour map {name!r}; use a matplotlib name such as {COLORMAPS}") from None
    lut = (cmap(np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
    lut.flags.writeable = False
    return lut


def colorize(values: np.ndarray, vmin: float, vmax: float, cmap: str = "hot") -> np.ndarray:
    """Values mapped through a colour map between ``vmin`` and ``vmax``, as (H, W, 3) uint8."""
    span = max(float(vmax) - float(vmin), 1e-12)
    norm = (np.asarray(values, dtype=np.float32) - float(vmin)) / span
    idx = np.clip(np.nan_to_num(norm, nan=0.0) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return colormap_lut(cmap)[idx]


def overlay(
    rgb: np.ndarray,
    values: np.ndarray,
    *,
    threshold: float,
    vmax: float,
    cmap: str = "hot",
    opacity: float = 0.6,
) -> np.ndarray:
    """Blend a colour-mapped map onto ``rgb`` where ``values >= threshold``; colours span threshold..vmax."""
    base = np.asarray(rgb, dtype=np.uint8)
    vals = np.asarray(values, dtype=np.float32)
    if vals.shape != base.shape[:2]:
        raise ValueError(
            f"overlay: map picture {vals.shape} does not match the base picture {base.shape[:2]}"
        )
    alpha = float(np.clip(opacity, 0.0, 1.0))
    shown = np.isfinite(vals) & (vals >= float(threshold))
    if alpha == 0.0 or not shown.any():
        return base.copy()
    top = max(float(vmax), float(threshold) + 1e-6)
    colours = colorize(vals[shown], float(threshold), top, cmap).astype(np.float32)
    out = base.copy()
    out[shown] = (alpha * colours + (1.0 - alpha) * base[shown].astype(np.float32) + 0.5).astype(np.uint8)
    return out


def outline(rgb: np.ndarray, mask: np.ndarray, color: Color = (0, 255, 255)) -> np.ndarray:
    """Draw the one-pixel border of a boolean mask onto ``rgb``."""
    m = np.asarray(mask, dtype=bool)
    if m.shape != rgb.shape[:2]:
        raise ValueError(f"outline: mask picture {m.shape} does not match the base picture {rgb.shape[:2]}")
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    out = np.array(rgb, dtype=np.uint8, copy=True)
    out[m & ~inner] = color
    return out


def draw_crosshair(
    rgb: np.ndarray, row: int, col: int, color: Color = (0, 255, 0), gap: int = 4
) -> np.ndarray:
    """Horizontal and vertical lines through (row, col), with a gap around the point itself."""
    out = np.array(rgb, dtype=np.uint8, copy=True)
    h, w = out.shape[:2]
    row, col = int(np.clip(row, 0, h - 1)), int(np.clip(col, 0, w - 1))
    cols = np.r_[0 : max(col - gap, 0), min(col + gap + 1, w) : w]
    rows = np.r_[0 : max(row - gap, 0), min(row + gap + 1, h) : h]
    out[row, cols] = color
    out[rows, col] = color
    return out


# --------------------------------------------------------------------------------------------- pictures


def display_size(
    n_rows: int, n_cols: int, pixel_mm: tuple[float, float], target: int = 320
) -> tuple[int, int]:
    """(rows, cols) of the displayed picture: square millimetres, the longer side close to ``target``."""
    height_mm, width_mm = n_rows * pixel_mm[0], n_cols * pixel_mm[1]
    scale = target / max(height_mm, width_mm, 1e-6)
    return max(1, round(height_mm * scale)), max(1, round(width_mm * scale))


def resize_nearest(picture: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a (H, W) or (H, W, C) array to ``size`` = (rows, cols)."""
    h, w = picture.shape[:2]
    rows = np.minimum((np.arange(size[0]) + 0.5) * h / size[0], h - 1).astype(np.intp)
    cols = np.minimum((np.arange(size[1]) + 0.5) * w / size[1], w - 1).astype(np.intp)
    return picture[rows[:, None], cols[None, :]]


def scale_point(row: int, col: int, shape: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """Where pixel (row, col) of a picture of ``shape`` lands (its centre) after resizing to ``size``."""
    return int((row + 0.5) * size[0] / shape[0]), int((col + 0.5) * size[1] / shape[1])


@dataclass(frozen=True)
class OverlayStyle:
    """How an anomaly map is drawn over a slice: colour map, opacity, threshold and top of the colour scale."""

    threshold: float
    vmax: float
    cmap: str = "hot"
    opacity: float = 0.6


BRAIN_COLOR: Color = (255, 170, 0)
"""Outline colour of the brain mask (the findings mask is cyan, the crosshair green)."""


def render_plane(
    base: CanonicalVolume,
    plane: str,
    index: int,
    *,
    window: tuple[float, float],
    overlay_map: CanonicalVolume | None = None,
    style: OverlayStyle | None = None,
    mask: CanonicalVolume | None = None,
    crosshair: Sequence[int] | None = None,
    target: int = 320,
    crosshair_color: Color = (0, 255, 0),
    brain: CanonicalVolume | None = None,
    brain_color: Color = BRAIN_COLOR,
) -> np.ndarray:
    """One plane of ``base`` with window/level, an optional thresholded overlay, optional outlines of the
    brain mask scoring used (``brain``) and of a findings mask, and a crosshair at the canonical voxel
    ``crosshair``, resized for display (RGB uint8)."""
    picture = extract_slice(base.data, plane, index)
    rgb = gray_to_rgb(apply_window(picture, *window))
    for other, what in ((overlay_map, "anomaly map"), (mask, "mask"), (brain, "brain mask")):
        if other is not None and other.shape != base.shape:
            raise ValueError(
                f"render_plane: {what} shape {other.shape} differs from the image shape {base.shape}"
            )
    if overlay_map is not None and style is not None:
        rgb = overlay(
            rgb,
            extract_slice(overlay_map.data, plane, index),
            threshold=style.threshold,
            vmax=style.vmax,
            cmap=style.cmap,
            opacity=style.opacity,
        )
    size = display_size(picture.shape[0], picture.shape[1], pixel_spacing(base.spacing, plane), target)
    out = resize_nearest(rgb, size)
    if brain is not None:
        out = outline(out, resize_nearest(extract_slice(brain.data, plane, index) > 0, size), color=brain_color)
    if mask is not None:
        out = outline(out, resize_nearest(extract_slice(mask.data, plane, index) > 0, size))
    if crosshair is not None:
        row, col = voxel_to_pixel(crosshair, base.shape, plane)
        out = draw_crosshair(out, *scale_point(row, col, picture.shape[:2], size), color=crosshair_color)
    return np.ascontiguousarray(out)


def render_map(
    values: CanonicalVolume,
    plane: str,
    index: int,
    *,
    vmin: float,
    vmax: float,
    cmap: str = "hot",
    threshold: float | None = None,
    crosshair: Sequence[int] | None = None,
    target: int = 320,
) -> np.ndarray:
    """One plane of a map drawn in colour from ``vmin`` to ``vmax``, with the ``>= threshold`` region outlined."""
    picture = extract_slice(values.data, plane, index)
    rgb = colorize(picture, vmin, vmax, cmap)
    size = display_size(picture.shape[0], picture.shape[1], pixel_spacing(values.spacing, plane), target)
    out = resize_nearest(rgb, size)
    if threshold is not None:
        out = outline(out, resize_nearest(np.nan_to_num(picture, nan=-np.inf) >= threshold, size))
    if crosshair is not None:
        row, col = voxel_to_pixel(crosshair, values.shape, plane)
        out = draw_crosshair(out, *scale_point(row, col, picture.shape[:2], size))
    return np.ascontiguousarray(out)


def to_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an (H, W), (H, W, 3) or (H, W, 4) uint8 picture."""
    from PIL import Image

    array = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()

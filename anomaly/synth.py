"""Synthetic lesions painted into healthy brains, for demos, tests and threshold calibration.

Each lesion is an irregular blob (a few merged ellipsoids roughened by smooth noise) with a soft edge,
placed inside the brain mask and worked on within its own bounding box, so a 182x218x182 volume takes
milliseconds per lesion. Everything is drawn from one ``np.random.Generator`` seed: the same seed gives
the same lesions. Kinds:

- ``hyperintense``: bright blob above the brain's 99th percentile (e.g. FLAIR white-matter lesions);
- ``hypointense``: dark blob below the 1st percentile (e.g. a cavity or a T1 black hole);
- ``mass``: bright rim around a dark necrotic core, optionally pushing the tissue around it outward;
- ``texture``: the normal intensity range with a foreign pattern (grey/white granules, or noise with the
  region's own mean and spread): only the texture is wrong;
- ``swap``: a mirrored patch of tissue copied from elsewhere in the same brain (normal values, wrong place).

``texture`` and ``swap`` stay inside the brain's 1st..99th percentile range: an intensity threshold
cannot find them, which is what makes them useful for testing a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

KINDS: tuple[str, ...] = ("hyperintense", "hypointense", "mass", "texture", "swap")
IN_RANGE_KINDS: frozenset[str] = frozenset({"texture", "swap"})

_EDGE = 0.35  # width of the soft edge, in units of the lesion radius
_MIN_COVERAGE = 0.95  # share of a lesion's ball that must lie inside the brain


@dataclass(frozen=True)
class BrainStats:
    """Intensity percentiles of the brain voxels, the reference for lesion contrast and the normal range."""

    p1: float
    p30: float
    p50: float
    p85: float
    p99: float
    minimum: float

    @property
    def span(self) -> float:
        return max(self.p99 - self.p1, 1e-6)

    @classmethod
    def from_volume(cls, data: np.ndarray, brain_mask: np.ndarray) -> BrainStats:
        """Percentiles of ``data`` inside ``brain_mask``."""
        values = data[brain_mask]
        if values.size == 0:
            raise ValueError("the brain mask is empty: no brain voxels to place lesions in")
        p1, p30, p50, p85, p99 = (float(v) for v in np.percentile(values, [1, 30, 50, 85, 99]))
        return cls(p1=p1, p30=p30, p50=p50, p85=p85, p99=p99, minimum=float(values.min()))


@dataclass(frozen=True)
class LesionSpec:
    """One synthetic lesion: its kind, centre voxel, equivalent radius (mm), strength (0..1) and own seed."""

    kind: str
    center: tuple[int, int, int]
    radius_mm: float
    strength: float = 0.5
    seed: int = 0
    mass_effect_mm: float = 0.0


def plan_lesions(brain_mask: np.ndarray, spacing: Sequence[float], *, kinds: Sequence[str] = KINDS,
                 n: int = 3, seed: int | np.random.Generator | None = 0,
                 radius_mm: tuple[float, float] = (4.0, 12.0), mass_effect_mm: float = 0.0) -> list[LesionSpec]:
    """Choose ``n`` non-overlapping lesions inside the brain; kinds cycle through ``kinds`` in random order."""
    kinds = _check_kinds(kinds)
    brain_mask = np.asarray(brain_mask, dtype=bool)
    if brain_mask.ndim != 3 or not brain_mask.any():
        raise ValueError(f"the brain mask must be a non-empty 3D array, got shape {brain_mask.shape}")
    low, high = float(radius_mm[0]), float(radius_mm[1])
    if not 0 < low <= high:
        raise ValueError(f"radius_mm must be (min, max) with 0 < min <= max, got {radius_mm}")
    rng = np.random.default_rng(seed)
    spacing_arr = _spacing(spacing)
    order = rng.permutation(len(kinds))
    placed: list[tuple[np.ndarray, float]] = []
    specs: list[LesionSpec] = []
    for index in range(n):
        kind = kinds[int(order[index % len(kinds)])]
        radius = float(rng.uniform(low, high))
        center = None
        for attempt in range(6):
            center = _find_center(brain_mask, spacing_arr, radius, rng, placed,
                                  coverage=_MIN_COVERAGE if attempt < 3 else 0.8)
            if center is not None:
                break
            radius = max(radius * 0.8, min(low, 1.5 * float(spacing_arr.max())))
        if center is None:
            raise ValueError(f"no room for lesion {index + 1} of {n} (radius {radius:.1f} mm) inside the brain "
                             "mask: ask for fewer or smaller lesions")
        placed.append((np.asarray(center) * spacing_arr, radius))
        specs.append(LesionSpec(kind=kind, center=center, radius_mm=radius,
                                strength=float(rng.uniform(0.3, 0.8)), seed=int(rng.integers(2**31)),
                                mass_effect_mm=mass_effect_mm if kind == "mass" else 0.0))
    return specs


def apply_lesions(data: np.ndarray, brain_mask: np.ndarray, spacing: Sequence[float],
                  specs: Sequence[LesionSpec], stats: BrainStats | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Paint planned lesions into a float32 copy of ``data``; return it and the boolean ground truth.

    The ground truth holds the voxels at or above half of the lesion's contrast (its soft rim below half
    lies outside); with ``mass_effect_mm`` the displaced tissue around a mass also changes.
    """
    data = np.asarray(data)
    brain_mask = np.asarray(brain_mask, dtype=bool)
    if data.shape != brain_mask.shape or data.ndim != 3:
        raise ValueError(f"data {data.shape} and brain mask {brain_mask.shape} must be 3D arrays of one shape")
    stats = stats or BrainStats.from_volume(data, brain_mask)
    out = np.array(data, dtype=np.float32)
    truth = np.zeros(data.shape, dtype=bool)
    spacing_arr = _spacing(spacing)
    for spec in specs:
        _paint(out, truth, brain_mask, spacing_arr, spec, stats)
    return out, truth


def add_lesions(data: np.ndarray, brain_mask: np.ndarray, spacing: Sequence[float],
                kinds: Sequence[str] = KINDS, n: int = 3, seed: int | np.random.Generator | None = 0,
                radius_mm: tuple[float, float] = (4.0, 12.0), *,
                mass_effect_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Add ``n`` synthetic lesions inside ``brain_mask``; return (volume with lesions, boolean ground truth).

    Deterministic for an integer seed. ``spacing`` is the voxel size in mm per array axis.
    """
    brain_mask = np.asarray(brain_mask, dtype=bool)
    specs = plan_lesions(brain_mask, spacing, kinds=kinds, n=n, seed=seed, radius_mm=radius_mm,
                         mass_effect_mm=mass_effect_mm)
    return apply_lesions(data, brain_mask, spacing, specs)


# --------------------------------------------------------------------------------------------------


def _check_kinds(kinds: Sequence[str] | str) -> tuple[str, ...]:
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown:
        raise ValueError(f"unknown lesion kind(s) {unknown or '(none given)'}; choose from {', '.join(KINDS)}")
    return kinds


def _spacing(spacing: Sequence[float]) -> np.ndarray:
    arr = np.asarray(spacing, dtype=np.float64)
    if arr.shape != (3,) or np.any(arr <= 0) or not np.all(np.isfinite(arr)):
        raise ValueError(f"spacing must be three positive voxel sizes in mm, got {spacing}")
    return arr


def _ball_offsets(radius: float, spacing: np.ndarray, rng: np.random.Generator, count: int = 160) -> np.ndarray:
    """Integer voxel offsets of random points in a ball of ``radius`` mm (plus the centre)."""
    direction = rng.standard_normal((count, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    length = radius * rng.random(count) ** (1 / 3)
    points = direction * length[:, None] / spacing
    return np.vstack([np.zeros((1, 3)), np.rint(points)]).astype(np.int64)


def _inside_share(mask: np.ndarray, center: np.ndarray, offsets: np.ndarray) -> float:
    points = center + offsets
    valid = np.all((points >= 0) & (points < np.asarray(mask.shape)), axis=1)
    hits = np.zeros(len(points), dtype=bool)
    hits[valid] = mask[tuple(points[valid].T)]
    return float(hits.mean())


def _find_center(mask: np.ndarray, spacing: np.ndarray, radius: float, rng: np.random.Generator,
                 placed: Sequence[tuple[np.ndarray, float]], coverage: float,
                 tries: int = 400, extent: float = 1.3) -> tuple[int, int, int] | None:
    """A brain voxel whose ball of ``extent * radius`` is mostly in the brain and clear of placed lesions."""
    lows, highs = _bbox(mask)
    offsets = _ball_offsets(radius * extent, spacing, rng)
    candidates = rng.integers(lows, highs, size=(tries * 4, 3))
    candidates = candidates[mask[tuple(candidates.T)]][:tries]
    for candidate in candidates:
        position = candidate * spacing
        if any(np.linalg.norm(position - other) < 1.4 * (radius + r) + 2.0 for other, r in placed):
            continue
        if _inside_share(mask, candidate, offsets) >= coverage:
            return tuple(int(c) for c in candidate)  # type: ignore[return-value]
    return None


def _bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lows, highs = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        lows.append(hit[0])
        highs.append(hit[-1] + 1)
    return np.asarray(lows), np.asarray(highs)


def _box(center: Sequence[int], half: np.ndarray, shape: Sequence[int]) -> tuple[tuple[slice, ...], np.ndarray]:
    """Slices of a box around ``center`` clipped to the volume, and the centre's position in the box."""
    start = np.maximum(np.asarray(center) - half, 0)
    stop = np.minimum(np.asarray(center) + half + 1, np.asarray(shape))
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True)), np.asarray(center) - start


def _coords_mm(box: tuple[slice, ...], center_in_box: np.ndarray, spacing: np.ndarray) -> list[np.ndarray]:
    sizes = [s.stop - s.start for s in box]
    return [((np.arange(size) - c) * sp).reshape([-1 if a == axis else 1 for a in range(3)])
            for axis, (size, c, sp) in enumerate(zip(sizes, center_in_box, spacing, strict=True))]


def _smooth_noise(shape: Sequence[int], sigma_vox: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(tuple(shape)).astype(np.float32), sigma_vox, mode="reflect")
    return field / max(float(field.std()), 1e-6)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _distance_field(coords: list[np.ndarray], radius: float, spacing: np.ndarray,
                    rng: np.random.Generator) -> np.ndarray:
    """Normalised distance (1 at the edge) of an irregular blob: merged ellipsoids plus smooth noise."""
    grid = np.stack(np.broadcast_arrays(*coords), axis=-1)
    distance = np.full(grid.shape[:3], np.inf, dtype=np.float32)
    for part in range(int(rng.integers(1, 4))):
        offset = np.zeros(3) if part == 0 else np.clip(rng.normal(0.0, 0.35 * radius, 3), -0.6 * radius, 0.6 * radius)
        radii = radius * rng.uniform(0.7, 1.05, 3) * (1.0 if part == 0 else rng.uniform(0.5, 0.8))
        local = (grid - offset) @ _rotation(rng) / radii
        distance = np.minimum(distance, np.sqrt((local**2).sum(axis=-1)).astype(np.float32))
    sigma = np.maximum(0.3 * radius / spacing, 0.7)
    distance += 0.12 * _smooth_noise(distance.shape, sigma, rng)
    return distance


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _paint(out: np.ndarray, truth: np.ndarray, brain: np.ndarray, spacing: np.ndarray, spec: LesionSpec,
           stats: BrainStats) -> None:
    """Paint one lesion in place, within its bounding box."""
    if spec.kind not in KINDS:
        raise ValueError(f"unknown lesion kind {spec.kind!r}; choose from {', '.join(KINDS)}")
    if len(spec.center) != 3 or not all(0 <= c < s for c, s in zip(spec.center, out.shape, strict=False)):
        raise ValueError(f"lesion centre {spec.center} lies outside the volume of shape {out.shape}")
    if not spec.radius_mm > 0:
        raise ValueError(f"lesion radius must be positive, got {spec.radius_mm} mm")
    rng = np.random.default_rng(spec.seed)
    radius = spec.radius_mm
    if spec.mass_effect_mm > 0:
        wide, wide_center = _box(spec.center, np.ceil(2.6 * radius / spacing).astype(int) + 1, out.shape)
        _push_outward(out, wide, brain[wide], _coords_mm(wide, wide_center, spacing), radius,
                      spec.mass_effect_mm, spacing)
    box, center_in_box = _box(spec.center, np.ceil(1.7 * radius / spacing).astype(int) + 1, out.shape)
    coords = _coords_mm(box, center_in_box, spacing)
    brain_box = brain[box]
    distance = _distance_field(coords, radius, spacing, rng)
    weight = _smoothstep((1.0 - distance) / _EDGE) * brain_box
    center_index = tuple(int(c) for c in center_in_box)
    if weight[center_index] < 0.5 and brain_box[center_index]:
        weight[center_index] = 1.0  # a lesion is never empty, however thin the voxels
    original = out[box]
    lesion = _intensity(spec, out, original, distance, weight, brain, box, spacing, stats, rng)
    changed = weight > 0
    painted = original + weight * (lesion - original)
    if spec.kind in IN_RANGE_KINDS:
        painted = np.clip(painted, stats.p1, stats.p99)
    elif stats.minimum >= 0:
        painted = np.maximum(painted, 0.1 * stats.p1)  # dark lesions stay above the zero background
    out[box] = np.where(changed, painted, original)
    truth[box] |= weight >= 0.5


def _intensity(spec: LesionSpec, volume: np.ndarray, original: np.ndarray, distance: np.ndarray,
               weight: np.ndarray, brain: np.ndarray, box: tuple[slice, ...], spacing: np.ndarray,
               stats: BrainStats, rng: np.random.Generator) -> np.ndarray:
    """The lesion's own intensity over the box (blended with the tissue by the caller)."""
    span, strength = stats.span, spec.strength
    inside = weight >= 0.5
    local_mean = float(original[inside].mean()) if inside.any() else stats.p50
    detail = original - local_mean  # a little of the underlying anatomy shows through
    grain = _smooth_noise(original.shape, np.full(3, 0.8) / np.minimum(spacing, 1.0), rng)
    floor = 0.15 * stats.p1 if stats.minimum >= 0 else -np.inf
    if spec.kind == "hyperintense":
        level = stats.p99 + (0.15 + 0.45 * strength) * span
        return level + 0.25 * detail + 0.04 * span * grain
    if spec.kind == "hypointense":
        level = max(stats.p1 - (0.1 + 0.4 * strength) * span, floor)
        return level + 0.1 * detail + 0.02 * span * grain
    if spec.kind == "mass":
        rim = stats.p99 + (0.1 + 0.4 * strength) * span
        core = max(stats.p1 - (0.05 + 0.3 * strength) * span, floor)
        profile = _smoothstep((distance - 0.45) / 0.25)
        return core + (rim - core) * profile + 0.03 * span * grain
    if spec.kind == "texture":
        if rng.random() < 0.5:  # grey/white granules: the tissue's two levels in a foreign pattern
            granules = _smooth_noise(original.shape, np.full(3, 1.2) / spacing, rng) > 0
            pattern = np.where(granules, stats.p85, stats.p30).astype(np.float32)
            pattern = ndimage.gaussian_filter(pattern, 0.6 / spacing)
            return pattern + 0.03 * span * grain
        spread = float(original[inside].std()) if inside.sum() > 1 else 0.1 * span
        noise = _smooth_noise(original.shape, np.full(3, 0.6) / spacing, rng)
        return local_mean + max(spread, 0.12 * span) * noise
    return _swapped_patch(spec, volume, original, inside, brain, box, spacing, rng)


def _swapped_patch(spec: LesionSpec, volume: np.ndarray, original: np.ndarray, inside: np.ndarray,
                   brain: np.ndarray, box: tuple[slice, ...], spacing: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    """Tissue from another brain location, mirrored along a random axis: of a few candidate locations the
    one that differs most from the lesion site. Voxels whose source lies outside the brain keep their value
    (the box's own tissue, mirrored, when no other location fits)."""
    sizes = np.asarray([s.stop - s.start for s in box])
    corner = np.asarray([s.start for s in box])
    placed = [(np.asarray(spec.center) * spacing, spec.radius_mm)]
    axis = int(rng.integers(3))
    best, best_score = None, -1.0
    for _ in range(8):
        source = _find_center(brain, spacing, spec.radius_mm, rng, placed, coverage=0.9, tries=100)
        if source is None:
            break
        start = np.asarray(source) - (np.asarray(spec.center) - corner)
        stop = start + sizes
        if np.any(start < 0) or np.any(stop > np.asarray(brain.shape)):
            continue
        source_box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))
        patch = np.where(np.flip(brain[source_box], axis=axis), np.flip(volume[source_box], axis=axis), original)
        score = float(np.abs(patch - original)[inside].mean()) if inside.any() else 0.0
        if score > best_score:
            best, best_score = patch, score
    if best is None:
        best = np.where(np.flip(brain[box], axis=axis), np.flip(original, axis=axis), original)
    return best


def _push_outward(out: np.ndarray, box: tuple[slice, ...], brain_box: np.ndarray, coords: list[np.ndarray],
                  radius: float, amount_mm: float, spacing: np.ndarray) -> None:
    """Mass effect: move the tissue around the lesion radially outward by up to ``amount_mm``."""
    grid = np.stack(np.broadcast_arrays(*coords), axis=0)
    rho = np.sqrt((grid**2).sum(axis=0))
    shift = amount_mm * np.where(rho < radius, rho / radius, np.exp(-(((rho - radius) / (0.6 * radius)) ** 2)))
    unit = grid / np.maximum(rho, 1e-6)
    source = grid - unit * shift  # each voxel takes its value from closer to the centre
    origin = np.asarray([c.reshape(-1)[0] for c in coords])  # mm coordinate of the box's first voxel
    index = (source - origin.reshape(3, 1, 1, 1)) / spacing.reshape(3, 1, 1, 1)
    original = out[box]
    moved = ndimage.map_coordinates(original, index, order=1, mode="nearest")
    out[box] = np.where(brain_box & (shift > 0.02), moved, original)

"""MONAI preprocessing from a native volume to model slices, and the exact way back.

Forward: canonical orientation, resampling to the model spacing, brain mask, robust intensity
scaling inside the brain, crop to the brain and pad to the model's slice size. Backward: any array
on that model grid is resampled onto the input's own shape and affine with MONAI's SpatialResample, or
copied voxel for voxel where both grids share one lattice (:mod:`anomaly.lattice`; same values, no interpolation).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    CropForeground,
    Orientation,
    ResizeWithPadOrCrop,
    Spacing,
    SpatialResample,
    Transform,
)
from scipy import ndimage

from anomaly.config import PreprocessConfig
from anomaly.contrast import resolve_contrast
from anomaly.lattice import copy_on_lattice, lattice_map
from anomaly.volume import Volume, VolumeError

_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: in-plane slice size (pixels) and voxel spacing (mm)."""

    slice_size: int = 192
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    multiple_of: int = 8


@dataclass
class PreparedVolume:
    """A volume on the model grid: intensities in [0, max_value] (1 = upper brain percentile), brain mask, the axial
    slices to score, and the contrast it is scored as (None when neither the settings nor its file name say).
    ``registration`` (an :class:`anomaly.registration.Registration`) is set when the model grid was cut from
    the MNI152 template grid rather than from the input's; ``stages`` records what the stages before did."""

    image: np.ndarray
    mask: np.ndarray
    slices: np.ndarray
    affine: np.ndarray
    native_shape: tuple[int, int, int]
    native_affine: np.ndarray
    brain_volume_ml: float
    intensity_range: tuple[float, float]
    warnings: list[str] = field(default_factory=list)
    contrast: str | None = None
    registration: Any = None
    stages: dict[str, Any] = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]


class BrainMask(Transform):
    """Brain mask of a skull-stripped image: voxels that differ from the border background value,
    holes filled, largest connected component kept. Works for zero and constant non-zero background."""

    def __init__(self, tolerance: float = 0.01) -> None:
        self.tolerance = tolerance

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        arr = img[0].detach().cpu().numpy()
        faces = np.concatenate([arr[0].ravel(), arr[-1].ravel(), arr[:, 0].ravel(), arr[:, -1].ravel(),
                                arr[:, :, 0].ravel(), arr[:, :, -1].ravel()])
        values, counts = np.unique(faces, return_counts=True)
        background = float(values[np.argmax(counts)])
        spread = float(np.percentile(np.abs(arr - background), 99.5))
        if spread <= 0:
            return torch.zeros_like(img, dtype=torch.bool)
        mask = np.abs(arr - background) > self.tolerance * spread
        return torch.as_tensor(largest_component(fill_holes(mask)))[None]


class ScaleInBrain(Transform):
    """Map the [lower, upper] percentiles of brain intensities to [0, 1], clip to [0, max_value] (values
    above 1 keep very bright lesions distinct for intensity maps; models clamp to [0, 1]), zero outside."""

    def __init__(self, lower: float = 0.5, upper: float = 99.5, max_value: float = 1.5) -> None:
        self.lower, self.upper, self.max_value = lower, upper, max_value
        self.last_range: tuple[float, float] = (0.0, 1.0)

    def __call__(self, img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        inside = img[mask]
        lo, hi = (float(v) for v in quantiles(_subsample(inside), torch.tensor(
            [self.lower / 100, self.upper / 100], dtype=inside.dtype)))
        if hi <= lo:
            hi = lo + 1e-6
        self.last_range = (lo, hi)
        out = ((img - lo) / (hi - lo)).clamp(0, self.max_value) * mask
        return out


def quantiles(values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation, the same bits) of a 1-D CPU tensor, by partial
    selection of the few ranks it reads instead of a full sort (64 -> 8 ms on a BraTS T2 brain's 1.45 M voxels)."""
    n = values.numel()
    if n == 0:
        raise ValueError("quantiles of an empty set of values")
    ranks = q.to(values.dtype) * (n - 1)
    below = ranks.floor().long().clamp(0, n - 1)
    above = ranks.ceil().long().clamp(0, n - 1)
    kth = np.unique(np.concatenate([below.numpy(), above.numpy()]))
    picked = torch.from_numpy(np.partition(values.detach().numpy(), kth))
    return torch.lerp(picked[below], picked[above], ranks - below.to(values.dtype))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the background pockets a mask encloses: what MONAI's ``FillHoles`` does (background not
    reachable from the array's faces with full connectivity), by one labelling pass instead of a dilation
    grown until it stops (3x faster on a 1 mm brain), over the mask's bounding box alone."""
    mask = np.asarray(mask, dtype=bool)
    box = _bounding_box(mask, margin=1)  # a ring of background around the box: every path out crosses it
    out = np.zeros(mask.shape, dtype=bool)
    if box is None:
        return out
    inner = mask[box]
    labels, n = ndimage.label(~inner, structure=np.ones((3,) * inner.ndim, dtype=bool))
    if n == 0:
        out[box] = inner
        return out
    open_to_face = np.zeros(n + 1, dtype=bool)
    for axis in range(inner.ndim):
        for end in (0, -1):
            open_to_face[np.take(labels, end, axis=axis)] = True
    open_to_face[0] = False
    out[box] = ~open_to_face[labels]
    return out


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest face-connected component of a boolean mask (labelled over its bounding box)."""
    mask = np.asarray(mask, dtype=bool)
    box = _bounding_box(mask)
    if box is None:
        return mask.copy()
    labels, n = ndimage.label(mask[box])
    if n <= 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    out = np.zeros(mask.shape, dtype=bool)
    out[box] = labels == int(np.argmax(sizes))
    return out


def _bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """The index box of a boolean mask's True voxels grown by ``margin`` within the array; None if empty."""
    found = ndimage.find_objects(np.ascontiguousarray(mask).view(np.uint8))
    if not found or found[0] is None:
        return None
    return tuple(slice(max(0, b.start - margin), min(n, b.stop + margin)) for b, n in zip(found[0], mask.shape, strict=True))


def _subsample(values: torch.Tensor, limit: int = 4_000_000) -> torch.Tensor:
    """A strided subsample of very large inputs (as torch.quantile needed; kept so percentiles stay the same)."""
    if values.numel() <= limit:
        return values
    step = int(np.ceil(values.numel() / limit))
    return values[::step]


def prepare_volume(volume: Volume, config: PreprocessConfig, spec: InputSpec,
                   brain_mask: np.ndarray | None = None) -> PreparedVolume:
    """Bring a validated volume onto the model grid (see module docstring). With ``brain_mask`` (on the
    volume's grid, e.g. from brain extraction) that mask is used instead of the foreground."""
    spacing = tuple(config.spacing or spec.spacing)
    size = int(config.slice_size or spec.slice_size)
    if size % spec.multiple_of:
        raise VolumeError(volume.path, f"slice size {size} is not a multiple of {spec.multiple_of}",
                          "choose a slice_size the model accepts")
    channels = [torch.as_tensor(volume.data, dtype=torch.float32)]
    if brain_mask is not None:
        channels = [channels[0] * torch.as_tensor(brain_mask, dtype=torch.float32),
                    torch.as_tensor(brain_mask, dtype=torch.float32)]
    img = MetaTensor(torch.stack(channels), affine=torch.as_tensor(volume.affine, dtype=torch.float64))
    img = cast(MetaTensor, Orientation(axcodes=config.orientation, labels=_LABELS)(img))
    img = cast(MetaTensor, Spacing(pixdim=spacing, mode="bilinear", padding_mode="zeros", dtype=np.float32)(img))
    if brain_mask is not None:
        mask = torch.as_tensor(largest_component(img.as_tensor()[1].numpy() > 0.5))[None]
        img = cast(MetaTensor, img[:1] * mask)
    else:
        mask = BrainMask(config.mask_tolerance)(img)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    brain_ml = float(mask.sum()) * voxel_ml
    warnings: list[str] = []
    if brain_ml < config.min_brain_ml:
        raise VolumeError(volume.path, f"no brain found (foreground of {brain_ml:.1f} mL)",
                          "check that the file holds a brain MRI with a zero or constant background")
    if brain_ml > config.skull_volume_ml:
        warnings.append(
            f"foreground of {brain_ml:.0f} mL looks like a head with skull, not a skull-stripped brain; "
            "anomaly maps assume skull-stripped input: score it with --skull-strip auto (or force), or give its "
            "brain mask with --brain-mask")
    scale = ScaleInBrain(config.lower_percentile, config.upper_percentile, config.max_value)
    img = cast(MetaTensor, scale(img, mask))
    both = MetaTensor(torch.cat([img.as_tensor(), mask.float()]), affine=img.affine)
    both = cast(MetaTensor, CropForeground(select_fn=lambda x: x > 0, channel_indices=1, margin=2)(both))
    brain_extent = both.shape[1:3]
    both = cast(MetaTensor, ResizeWithPadOrCrop(spatial_size=(size, size, -1))(both))
    if max(brain_extent) > size + 4:
        warnings.append(f"brain extent {tuple(brain_extent)} voxels exceeds the {size}-pixel slice; edges were cropped")
    image = both.as_tensor()[0].numpy().astype(np.float32)
    box_mask = both.as_tensor()[1].numpy() > 0.5
    area = box_mask.sum(axis=(0, 1))
    slices = np.flatnonzero(area >= config.min_slice_brain_fraction * size * size)
    return PreparedVolume(
        image=image, mask=box_mask, slices=slices, affine=np.asarray(both.affine, dtype=np.float64),
        native_shape=volume.shape, native_affine=np.asarray(volume.affine, dtype=np.float64),
        brain_volume_ml=brain_ml, intensity_range=scale.last_range, warnings=warnings,
        contrast=resolve_contrast(config.contrast, volume.path))


def to_native(array: np.ndarray, prepared: PreparedVolume, mode: str = "bilinear") -> np.ndarray:
    """Resample an array on the model grid onto the input's own shape and affine (zeros outside); through
    the registration's inverse when the volume was registered."""
    reg = prepared.registration
    shape, affine = (reg.shape, reg.affine) if reg is not None else (prepared.native_shape, prepared.native_affine)
    grid = resample_grid(array, prepared.affine, tuple(shape), np.asarray(affine), mode)
    return reg.to_native(grid, mode) if reg is not None else grid


def resample_grid(array: np.ndarray, src_affine: np.ndarray, shape: tuple[int, ...], affine: np.ndarray,
                  mode: str = "bilinear") -> np.ndarray:
    """``array`` (on ``src_affine``) resampled onto ``shape`` and ``affine``, zeros outside: a copy where the
    grids share one lattice, else MONAI's SpatialResample."""
    array = np.asarray(array, dtype=np.float32)
    mapping = lattice_map(src_affine, affine)
    if mapping is not None:
        return copy_on_lattice(array, mapping, shape)
    src = MetaTensor(torch.as_tensor(array)[None], affine=torch.as_tensor(src_affine, dtype=torch.float64))
    out = cast(MetaTensor, SpatialResample(mode=mode, padding_mode="zeros", dtype=np.float32)(
        src, dst_affine=torch.as_tensor(affine, dtype=torch.float64), spatial_size=shape))
    return np.asarray(out.as_tensor()[0].numpy(), dtype=np.float32)


def prepare_scan(volume: Volume, config: PreprocessConfig, spec: InputSpec,
                 user_mask: str | os.PathLike[str] | None = None, contrast: str | None = None,
                 session_t1: str | os.PathLike[str] | None = None) -> PreparedVolume:
    """The stages before the model for a raw scan: brain extraction (``config.skull_strip``, or the user's
    mask; for a T2/FLAIR head the mask of ``session_t1``, a T1 of the same session, when given), optional
    registration to MNI152 (``config.register``), then :func:`prepare_volume`. Each stage
    records how to undo itself, so :func:`to_native` still lands on the input's own grid."""
    from anomaly.brain_extraction import brain_mask_for

    t0 = time.perf_counter()
    result, head_ml = brain_mask_for(volume, config.skull_strip, head_ml=config.skull_volume_ml,
                                     tolerance=config.mask_tolerance, size=config.skull_strip_size,
                                     user_mask=user_mask, contrast=contrast, session_t1=session_t1)
    stages: dict[str, Any] = {"skull_strip": result.method if result is not None else "none"}
    if result is not None and result.method == "t1":
        stages["session_t1"] = str(session_t1)
    if head_ml is not None:
        stages["foreground_ml"] = round(head_ml, 1)
    if result is not None:
        stages["brain_mask_ml"] = round(result.volume_ml, 1)
        stages["skull_strip_s"] = round(time.perf_counter() - t0, 3)
    mask = result.mask if result is not None else None
    if config.register == "none":
        prepared = prepare_volume(volume, config, spec, brain_mask=mask)
    else:
        from anomaly.registration import register_to_mni

        reg = register_to_mni(volume, mask, transform=config.register_transform)
        data = volume.data if mask is None else np.where(mask, volume.data, 0)
        warped = Volume(data=reg.to_template(data), affine=reg.affine, path=volume.path,
                        source_dtype=volume.source_dtype, warnings=volume.warnings)
        grid_mask = reg.to_template(mask.astype(np.float32), mode="nearest") > 0.5 if mask is not None else None
        prepared = prepare_volume(warped, config, spec, brain_mask=grid_mask)
        prepared.registration = reg
        prepared.native_shape = volume.shape
        prepared.native_affine = np.asarray(volume.affine, dtype=np.float64)
        stages.update(register=f"mni-{reg.kind}", register_s=round(reg.seconds, 3))
        if reg.overlap is not None:
            stages["template_dice"] = round(reg.overlap, 4)
    if result is not None and result.method == "template":
        prepared.warnings.append("brain mask from a head template registered to the scan (deepbet found no "
                                 "plausible brain in it): check the outline, or give --brain-mask")
    prepared.stages = stages
    return prepared

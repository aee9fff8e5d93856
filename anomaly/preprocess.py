"""MONAI preprocessing from a native volume to model slices, and the exact way back.

Forward: canonical orientation, resampling to the model spacing, brain mask, robust intensity
scaling inside the brain, crop to the brain and pad to the model's slice size. Backward: any array
on that model grid is resampled onto the input's own shape and affine with MONAI's SpatialResample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    CropForeground,
    FillHoles,
    Orientation,
    ResizeWithPadOrCrop,
    Spacing,
    SpatialResample,
    Transform,
)
from scipy import ndimage

from anomaly.config import PreprocessConfig
from anomaly.contrast import resolve_contrast
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
    slices to score, and the contrast it is scored as (None when neither the settings nor its file name say)."""

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

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]


class BrainMask(Transform):
    """Brain mask of a skull-stripped image: voxels that differ from the border background value,
    holes filled, largest connected component kept. Works for zero and constant non-zero background."""

    def __init__(self, tolerance: float = 0.01) -> None:
        self.tolerance = tolerance
        self.fill = FillHoles()

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        arr = img[0].detach().cpu().numpy()
        faces = np.concatenate([arr[0].ravel(), arr[-1].ravel(), arr[:, 0].ravel(), arr[:, -1].ravel(),
                                arr[:, :, 0].ravel(), arr[:, :, -1].ravel()])
        values, counts = np.unique(faces, return_counts=True)
        background = float(values[np.argmax(counts)])
        spread = float(np.percentile(np.abs(arr - background), 99.5))
        if spread <= 0:
            return torch.zeros_like(img, dtype=torch.bool)
        mask = torch.as_tensor(np.abs(arr - background) > self.tolerance * spread)[None]
        filled = np.asarray(self.fill(mask.to(torch.uint8)))[0] > 0
        return torch.as_tensor(largest_component(filled))[None]


class ScaleInBrain(Transform):
    """Map the [lower, upper] percentiles of brain intensities to [0, 1], clip to [0, max_value] (values
    above 1 keep very bright lesions distinct for intensity maps; models clamp to [0, 1]), zero outside."""

    def __init__(self, lower: float = 0.5, upper: float = 99.5, max_value: float = 1.5) -> None:
        self.lower, self.upper, self.max_value = lower, upper, max_value
        self.last_range: tuple[float, float] = (0.0, 1.0)

    def __call__(self, img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        inside = img[mask]
        lo, hi = (float(v) for v in torch.quantile(_subsample(inside), torch.tensor(
            [self.lower / 100, self.upper / 100], dtype=inside.dtype)))
        if hi <= lo:
            hi = lo + 1e-6
        self.last_range = (lo, hi)
        out = ((img - lo) / (hi - lo)).clamp(0, self.max_value) * mask
        return out


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest face-connected component of a boolean mask."""
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _subsample(values: torch.Tensor, limit: int = 4_000_000) -> torch.Tensor:
    """torch.quantile refuses very large inputs; a strided subsample keeps percentiles exact enough."""
    if values.numel() <= limit:
        return values
    step = int(np.ceil(values.numel() / limit))
    return values[::step]


def prepare_volume(volume: Volume, config: PreprocessConfig, spec: InputSpec) -> PreparedVolume:
    """Bring a validated volume onto the model grid (see module docstring)."""
    spacing = tuple(config.spacing or spec.spacing)
    size = int(config.slice_size or spec.slice_size)
    if size % spec.multiple_of:
        raise VolumeError(volume.path, f"slice size {size} is not a multiple of {spec.multiple_of}",
                          "choose a slice_size the model accepts")
    img = MetaTensor(torch.as_tensor(volume.data, dtype=torch.float32)[None],
                     affine=torch.as_tensor(volume.affine, dtype=torch.float64))
    img = Orientation(axcodes=config.orientation, labels=_LABELS)(img)
    img = Spacing(pixdim=spacing, mode="bilinear", padding_mode="zeros", dtype=np.float32)(img)
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
            "anomaly maps assume skull-stripped input: strip the skull first (e.g. with HD-BET or SynthStrip)")
    scale = ScaleInBrain(config.lower_percentile, config.upper_percentile, config.max_value)
    img = scale(img, mask)
    both = MetaTensor(torch.cat([img.as_tensor(), mask.float()]), affine=img.affine)
    both = CropForeground(select_fn=lambda x: x > 0, channel_indices=1, margin=2)(both)
    brain_extent = both.shape[1:3]
    both = ResizeWithPadOrCrop(spatial_size=(size, size, -1))(both)
    if max(brain_extent) > size + 4:
        warnings.append(f"brain extent {tuple(brain_extent)} voxels exceeds the {size}-pixel slice; edges were cropped")
    image = both[0].as_tensor().numpy().astype(np.float32)
    box_mask = both[1].as_tensor().numpy() > 0.5
    area = box_mask.sum(axis=(0, 1))
    slices = np.flatnonzero(area >= config.min_slice_brain_fraction * size * size)
    return PreparedVolume(
        image=image, mask=box_mask, slices=slices, affine=np.asarray(both.affine, dtype=np.float64),
        native_shape=volume.shape, native_affine=np.asarray(volume.affine, dtype=np.float64),
        brain_volume_ml=brain_ml, intensity_range=scale.last_range, warnings=warnings,
        contrast=resolve_contrast(config.contrast, volume.path))


def to_native(array: np.ndarray, prepared: PreparedVolume, mode: str = "bilinear") -> np.ndarray:
    """Resample an array on the model grid onto the input's own shape and affine (zeros outside)."""
    src = MetaTensor(torch.as_tensor(np.asarray(array, dtype=np.float32))[None],
                     affine=torch.as_tensor(prepared.affine, dtype=torch.float64))
    out = SpatialResample(mode=mode, padding_mode="zeros", dtype=np.float32)(
        src, dst_affine=torch.as_tensor(prepared.native_affine, dtype=torch.float64),
        spatial_size=prepared.native_shape)
    return np.asarray(out[0].as_tensor().numpy(), dtype=np.float32)

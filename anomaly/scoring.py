"""Scoring one volume: batched slice inference, map post-processing, the way back to the native grid,
and the scan score. Every step is configured by :class:`anomaly.config.ScoringSettings`."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from anomaly.config import PostprocessConfig, ScoreConfig, ScoringSettings
from anomaly.contrast import resolve_contrast
from anomaly.median import median_sizes, multiscale_median
from anomaly.models.base import SliceModel
from anomaly.models.routing import model_for
from anomaly.preprocess import PreparedVolume, prepare_scan, to_native
from anomaly.volume import Volume


@dataclass
class ScanMaps:
    """Everything scoring produced for one scan, on the native grid unless named ``grid_*``."""

    anomaly: np.ndarray
    brain_mask: np.ndarray
    score: float
    reconstruction: np.ndarray | None
    prepared: PreparedVolume
    grid_anomaly: np.ndarray
    grid_mask: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def warnings(self) -> list[str]:
        return self.prepared.warnings


def slices_to_batch(image: np.ndarray, index: np.ndarray) -> torch.Tensor:
    """Axial slices ``image[:, :, z]`` as a ``[B, 1, H, W]`` tensor, anterior up (the one slice layout
    used by training and scoring alike)."""
    stack = np.stack([np.rot90(image[:, :, z]) for z in index])
    return torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))[:, None]


def batch_to_slices(batch: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`slices_to_batch`: ``[B, 1, H, W]`` to ``[X, Y, B]``."""
    arr = batch[:, 0].float().numpy()
    return np.stack([np.rot90(s, k=-1) for s in arr], axis=-1)


def infer_grid_maps(prepared: PreparedVolume, model: SliceModel, *, batch_size: int = 16,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """Run the model over the brain slices; maps and reconstruction on the model grid (zero elsewhere)."""
    anomaly = np.zeros_like(prepared.image)
    recon: np.ndarray | None = None
    parts: dict[str, np.ndarray] = {}
    generator = torch.Generator().manual_seed(seed)
    context = model.volume_context(prepared)
    brain = prepared.mask.astype(np.float32)  # once per scan, not per batch
    for start in range(0, len(prepared.slices), batch_size):
        index = prepared.slices[start:start + batch_size]
        out = model.score_slices(slices_to_batch(prepared.image, index), generator=generator, context=context,
                                 mask=slices_to_batch(brain, index))
        anomaly[:, :, index] = batch_to_slices(out.anomaly)
        if out.reconstruction is not None:
            if recon is None:
                recon = np.zeros_like(prepared.image)
            recon[:, :, index] = batch_to_slices(out.reconstruction)
        for key, value in (out.parts or {}).items():
            parts.setdefault(key, np.zeros_like(prepared.image))[:, :, index] = batch_to_slices(value)
    if parts:
        anomaly = np.where(_slice_mask(prepared), model.combine_parts(parts, prepared, context), 0).astype(np.float32)
    return anomaly, recon


def _slice_mask(prepared: PreparedVolume) -> np.ndarray:
    """True on the scored slices (a map is zero on slices the model never saw)."""
    scored = np.zeros(prepared.image.shape[2], dtype=bool)
    scored[prepared.slices] = True
    return np.broadcast_to(scored, prepared.image.shape)


def erode_mask(mask: np.ndarray, erode_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """Shrink the brain mask by ``erode_mm`` so the brain's rim, where every model errs, is not scored."""
    if erode_mm <= 0:
        return mask
    radius = [max(0, int(np.floor(erode_mm / s))) for s in spacing]
    zz, yy, xx = np.ogrid[-radius[0]:radius[0] + 1, -radius[1]:radius[1] + 1, -radius[2]:radius[2] + 1]
    ball = (zz * spacing[0]) ** 2 + (yy * spacing[1]) ** 2 + (xx * spacing[2]) ** 2 <= erode_mm ** 2
    return ndimage.binary_erosion(mask, structure=ball, border_value=0)


def postprocess(anomaly: np.ndarray, mask: np.ndarray, config: PostprocessConfig,
                spacing: tuple[float, float, float],
                model_median: int | tuple[int, ...] = SliceModel.median_size,
                model_through_plane_mm: float = SliceModel.through_plane_mm) -> tuple[np.ndarray, np.ndarray]:
    """In-plane median filter (the config's size or sizes, else ``model_median``: the model's own; several
    sizes give the mean of their medians, :func:`anomaly.median.multiscale_median`), Gaussian smoothing
    across slices (the config's sigma, else the model's; axis 2 is the slice axis) and brain-mask erosion;
    returns the cleaned map and the scored mask."""
    scored = erode_mask(mask, config.erode_mm, spacing)
    out = np.zeros(anomaly.shape, dtype=np.float32)
    if not scored.any():
        return out, scored
    box = ndimage.find_objects(mask.astype(np.uint8))[0]  # the scored voxels lie inside the brain's box
    part, where = anomaly[box], scored[box]
    sizes = median_sizes(config.median_size if config.median_size is not None else model_median)
    if sizes != (1,):
        part = multiscale_median(part, sizes, where=where)
    sigma_mm = config.through_plane_mm if config.through_plane_mm is not None else model_through_plane_mm
    if sigma_mm > 0:
        # the slices are restored one by one, so their noise is independent from slice to slice while a
        # lesion spans several: averaging neighbouring slices lowers the noise and keeps the lesion
        part = ndimage.gaussian_filter1d(np.where(where, part, 0).astype(np.float32), sigma_mm / float(spacing[2]),
                                         axis=2, mode="constant")
    out[box] = np.where(where, part, 0)
    return out, scored


def scan_score(anomaly: np.ndarray, mask: np.ndarray, config: ScoreConfig) -> float:
    """One number per scan: the mean of its top ``fraction`` of brain voxels, the max, or the mean."""
    values = anomaly[mask]
    if values.size == 0:
        return 0.0
    if config.method == "max":
        return float(values.max())
    if config.method == "mean":
        return float(values.mean())
    k = max(1, int(round(config.fraction * values.size)))
    return float(np.partition(values, values.size - k)[-k:].mean())


def score_prepared(prepared: PreparedVolume, model: SliceModel, settings: ScoringSettings) -> ScanMaps:
    """Model work and the way back for a volume already on the model grid (made with the input spec of
    ``model_for(model, prepared.contrast)``)."""
    model = model_for(model, prepared.contrast)
    t0 = time.perf_counter()
    grid, recon = infer_grid_maps(prepared, model, batch_size=settings.batch_size, seed=settings.seed)
    t1 = time.perf_counter()
    grid, scored = postprocess(grid, prepared.mask, settings.postprocess, prepared.spacing, model.median_size,
                               model.through_plane_mm)
    score = scan_score(grid, scored, settings.score)
    native = np.clip(to_native(grid, prepared), 0, None)
    native_mask = to_native(scored.astype(np.float32), prepared, mode="nearest") > 0.5
    native = np.where(native_mask, native, 0).astype(np.float32)
    native_recon = None
    if recon is not None and settings.save_reconstruction:
        native_recon = to_native(recon, prepared)
    t2 = time.perf_counter()
    return ScanMaps(anomaly=native, brain_mask=native_mask, score=score, reconstruction=native_recon,
                    prepared=prepared, grid_anomaly=grid, grid_mask=scored,
                    timings={"model_s": t1 - t0, "post_s": t2 - t1})


def score_volume(volume: Volume, model: SliceModel, settings: ScoringSettings | None = None,
                 user_mask: str | os.PathLike[str] | None = None) -> ScanMaps:
    """The whole data flow of one scan (see the design): brain extraction and registration when the
    settings ask for them, preprocess, infer, post-process, back to native."""
    settings = settings or ScoringSettings()
    t0 = time.perf_counter()
    contrast = resolve_contrast(settings.preprocess.contrast, volume.path)
    prepared = prepare_scan(volume, settings.preprocess, model_for(model, contrast).input_spec, user_mask=user_mask)
    t1 = time.perf_counter()
    maps = score_prepared(prepared, model, settings)
    maps.timings = {"prepare_s": t1 - t0, **maps.timings, "total_s": time.perf_counter() - t0}
    return maps

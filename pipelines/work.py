"""The unit of batch work: one scan, scored with one model and settings, returned as a plain outcome.

``score_scan`` is a pure function of (task, model, settings, calibration) that never raises for bad
input, so any executor (local threads, a Dask cluster) can run it and the driver records the result.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anomaly.brain_extraction import StageUnavailable, find_user_mask
from anomaly.config import ScoringSettings
from anomaly.models.base import SliceModel
from anomaly.outputs import output_path
from anomaly.preprocess import PreparedVolume, prepare_scan
from anomaly.scoring import ScanMaps, score_prepared
from anomaly.volume import Volume, VolumeError, load_volume, save_nifti


@dataclass(frozen=True)
class ScanTask:
    """One input file and where its outputs go in ``out_dir`` (names in :mod:`anomaly.outputs`); ``brain_mask``
    is the user's mask file or folder of masks named like the scans (``--brain-mask``)."""

    path: Path
    stem: str
    content_hash: str
    out_dir: Path
    brain_mask: Path | None = None

    def output(self, kind: str) -> Path:
        return output_path(self.out_dir, self.stem, kind)


@dataclass(frozen=True)
class AppliedCalibration:
    """A stored calibration as scoring applies it: voxel threshold for masks, scan threshold for flags."""

    name: str
    voxel_threshold: float
    scan_threshold: float | None = None
    min_volume_ml: float = 0.05


@dataclass
class ScanOutcome:
    """What happened to one scan: status ``ok`` or ``failed``, the reason, outputs and facts."""

    task: ScanTask
    status: str
    error: str | None = None
    score: float | None = None
    flagged: bool | None = None
    map_path: str | None = None
    recon_path: str | None = None
    mask_path: str | None = None
    timing_s: float | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    findings: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Loaded:
    """A scan read and brought onto the model grid (the part a reader thread does ahead of the model)."""

    task: ScanTask
    volume: Volume | None = None
    prepared: PreparedVolume | None = None
    error: str | None = None
    seconds: float = 0.0


def load_and_prepare(task: ScanTask, model: SliceModel, settings: ScoringSettings) -> Loaded:
    """Read, validate and preprocess; a bad file becomes ``Loaded.error`` with its reason."""
    t0 = time.perf_counter()
    try:
        volume = load_volume(task.path)
        user_mask = find_user_mask(task.brain_mask, task.path) if task.brain_mask is not None else None
        prepared = prepare_scan(volume, settings.preprocess, model.input_spec, user_mask=user_mask)
        return Loaded(task, volume, prepared, seconds=time.perf_counter() - t0)
    except VolumeError as exc:
        return Loaded(task, error=str(exc), seconds=time.perf_counter() - t0)
    except StageUnavailable as exc:
        return Loaded(task, error=f"{task.path}: {exc}", seconds=time.perf_counter() - t0)
    except MemoryError:
        return Loaded(task, error=f"{task.path}: out of memory while reading; score it alone or on a larger machine",
                      seconds=time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - one bad file must never stop the batch
        return Loaded(task, error=f"{task.path}: unexpected error while reading: {exc!r}; "
                                  "report it with this file if it persists", seconds=time.perf_counter() - t0)


def finish_scan(loaded: Loaded, model: SliceModel, settings: ScoringSettings,
                calibration: AppliedCalibration | None = None, atlas: Any = None) -> ScanOutcome:
    """Model work, outputs written atomically, findings when a calibration is applied."""
    task = loaded.task
    if loaded.error is not None or loaded.volume is None or loaded.prepared is None:
        return ScanOutcome(task, "failed", error=loaded.error, timing_s=loaded.seconds)
    volume = loaded.volume
    facts = {"shape": list(volume.shape), "spacing": [round(s, 6) for s in volume.spacing],
             "orientation": volume.orientation, "dtype": volume.source_dtype}
    t0 = time.perf_counter()
    try:
        maps = score_prepared(loaded.prepared, model, settings)
        outcome = ScanOutcome(task, "ok", score=maps.score, facts=facts)
        warnings = list(loaded.prepared.warnings) + list(volume.warnings)
        if loaded.prepared.contrast is None and model.uses_contrast:
            warnings.append("contrast unknown (the file name names none): brightness counted as on T2/FLAIR; "
                            "pass --contrast t1 (or t2, flair) if that is wrong")
        outcome.details = {"warnings": warnings,
                           "timings": {"prepare_s": loaded.seconds, **maps.timings},
                           "brain_volume_ml": loaded.prepared.brain_volume_ml,
                           "n_slices": int(len(loaded.prepared.slices)),
                           "contrast": loaded.prepared.contrast, **loaded.prepared.stages}
        outcome.map_path = str(save_nifti(maps.anomaly, volume.affine, task.output("anomaly")))
        save_nifti(maps.brain_mask.astype(np.uint8), volume.affine, task.output("brain"), dtype=np.uint8)
        if maps.reconstruction is not None:
            outcome.recon_path = str(save_nifti(maps.reconstruction, volume.affine, task.output("recon")))
        if calibration is not None:
            _apply_calibration(outcome, maps, volume, calibration, atlas)
    except Exception as exc:  # noqa: BLE001 - reported per scan, the batch goes on
        detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return ScanOutcome(task, "failed", error=f"{task.path}: scoring failed: {detail}; check the model and "
                                                  "settings, or report it with this file", facts=facts,
                           timing_s=loaded.seconds + time.perf_counter() - t0)
    outcome.timing_s = loaded.seconds + time.perf_counter() - t0
    return outcome


def _apply_calibration(outcome: ScanOutcome, maps: ScanMaps, volume: Volume,
                       calibration: AppliedCalibration, atlas: Any) -> None:
    from anomaly.findings import extract_findings

    mask = (maps.anomaly >= calibration.voxel_threshold) & maps.brain_mask
    outcome.mask_path = str(save_nifti(mask.astype(np.uint8), volume.affine, outcome.task.output("mask"),
                                       dtype=np.uint8))
    if calibration.scan_threshold is not None:
        outcome.flagged = bool(outcome.score is not None and outcome.score >= calibration.scan_threshold)
    in_mni = False
    registration = maps.prepared.registration
    if atlas is not None and registration is not None:
        in_mni = True
    elif atlas is not None:
        from anomaly.atlas import is_mni_space

        in_mni = bool(is_mni_space(maps.brain_mask, volume.affine))
    findings = extract_findings(maps.anomaly, mask, volume.affine, min_volume_ml=calibration.min_volume_ml,
                                atlas=atlas, in_mni=in_mni,
                                to_atlas=registration.native_to_template_points if registration is not None else None)
    outcome.findings = [f.to_dict() for f in findings]
    outcome.details["calibration"] = {"name": calibration.name, "voxel_threshold": calibration.voxel_threshold,
                                      "scan_threshold": calibration.scan_threshold, "in_mni": in_mni}


def score_scan(task: ScanTask, model: SliceModel, settings: ScoringSettings,
               calibration: AppliedCalibration | None = None, atlas: Any = None) -> ScanOutcome:
    """The whole per-scan work in one call (what a remote worker runs)."""
    return finish_scan(load_and_prepare(task, model, settings), model, settings, calibration, atlas)


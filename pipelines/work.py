"""The unit of batch work: one scan, scored with one model and settings, returned as a plain outcome.

``score_scan`` is a pure function of (task, model, settings, calibration) that never raises for bad
input, so any executor (local threads, a Dask cluster) can run it and the driver records the result.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anomaly.brain_extraction import StageUnavailable, find_user_mask
from anomaly.calibration import Calibration
from anomaly.config import ScoringSettings
from anomaly.contrast import guess_contrast
from anomaly.io.dicom import DicomSeries, load_series
from anomaly.mask_transfer import find_session_t1
from anomaly.models.base import SliceModel
from anomaly.models.routing import model_for, route_note
from anomaly.outputs import output_path
from anomaly.preprocess import PreparedVolume, prepare_scan
from anomaly.records import ResultDetails
from anomaly.scoring import ScanMaps, score_prepared
from anomaly.volume import (
    LABEL_MAP_HINT,
    Volume,
    VolumeError,
    label_map_problem,
    load_volume,
    max_volume_bytes,
    save_nifti,
)


@dataclass(frozen=True)
class ScanTask:
    """One input and where its outputs go in ``out_dir`` (names in :mod:`anomaly.outputs`, or the
    BIDS derivative names in ``names``). An input is a NIfTI file, or a DICOM ``series``; ``contrast``
    is what the source says (series parameters, BIDS suffix), with ``contrast_note`` saying why;
    ``brain_mask`` is the user's mask file or folder of masks named like the scans (``--brain-mask``);
    ``t1_for_mask`` is where a T2/FLAIR head's brain mask comes from (``--t1-for-mask``): ``auto`` (a
    T1 of the same session found beside the scan), ``none`` (deepbet on the scan itself) or a T1 file."""

    path: Path
    stem: str
    content_hash: str
    out_dir: Path
    series: DicomSeries | None = None
    contrast: str | None = None
    contrast_note: str | None = None
    names: tuple[tuple[str, str], ...] = ()
    source: tuple[tuple[str, Any], ...] = ()
    max_bytes: int | None = None  # memory budget of the volume (None: anomaly.volume.max_volume_bytes())
    brain_mask: Path | None = None
    t1_for_mask: str = "auto"

    def output(self, kind: str) -> Path:
        for name_kind, relative in self.names:
            if name_kind == kind:
                return self.out_dir / relative
        return output_path(self.out_dir, self.stem, kind)

    @property
    def source_facts(self) -> dict[str, Any]:
        """What the store keeps about the source (see :mod:`anomaly.store.sources`)."""
        if self.series is not None:
            return self.series.store_facts()
        return dict(self.source) or {"source": "nifti"}


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
    details: ResultDetails = field(default_factory=ResultDetails)
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
        volume = load_series(task.series) if task.series is not None else load_volume(task.path, max_bytes=task.max_bytes)
        not_a_scan = label_map_problem(volume)
        if not_a_scan is not None:
            raise VolumeError(task.path, not_a_scan, LABEL_MAP_HINT)
        contrast = scan_contrast(task, settings)
        scoring = model_for(model, contrast)  # a model routed by contrast has one grid per route
        check_model_grid(volume, settings, scoring, task.max_bytes)
        user_mask = find_user_mask(task.brain_mask, task.path) if task.brain_mask is not None else None
        prepared = prepare_scan(volume, settings.preprocess, scoring.input_spec, user_mask=user_mask,
                                contrast=contrast, session_t1=session_t1_for(task, contrast))
        prepared.contrast = contrast  # what the route was chosen by, so scoring takes the same one
        route = route_note(model, contrast)
        if route is not None:
            prepared.stages["model"] = route
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


def scan_contrast(task: ScanTask, settings: ScoringSettings) -> str | None:
    """The contrast the scan is scored as: the setting, else what its source or file name says."""
    if settings.preprocess.contrast != "auto":
        return settings.preprocess.contrast
    return task.contrast or (guess_contrast(task.path) if task.series is None else None)


def session_t1_for(task: ScanTask, contrast: str | None) -> Path | None:
    """The T1 whose brain mask a T2/FLAIR scan uses (see ``ScanTask.t1_for_mask``), or None."""
    if contrast not in ("t2", "flair") or task.t1_for_mask == "none":
        return None
    if task.t1_for_mask == "auto":
        return find_session_t1(task.path) if task.series is None else None
    path = Path(task.t1_for_mask)
    if not path.is_file():
        raise VolumeError(path, "the T1 named by --t1-for-mask was not found",
                          "check the path, or use --t1-for-mask auto|none")
    return path


MODEL_GRID_COPIES = 4
"""Float32 arrays of the model-grid size that preprocessing and scoring hold at once (image, mask, map, resampling)."""


def check_model_grid(volume: Volume, settings: ScoringSettings, model: SliceModel, max_bytes: int | None) -> None:
    """Refuse a volume whose extent on the model's voxel grid would not fit the memory budget (a header
    with huge voxel sizes turns a small array into a vast one) before anything is resampled."""
    budget = max_volume_bytes() if max_bytes is None else int(max_bytes)
    spacing = np.asarray(settings.preprocess.spacing or model.input_spec.spacing, dtype=np.float64)
    extent = np.asarray(volume.shape, dtype=np.float64) * np.asarray(volume.spacing, dtype=np.float64)
    grid = tuple(int(n) for n in np.ceil(extent / spacing))
    needed = math.prod(grid) * 4 * MODEL_GRID_COPIES
    if needed > budget:
        raise VolumeError(volume.path, f"the volume spans {tuple(round(float(e)) for e in extent)} mm, "
                          f"{grid} voxels on the model's {tuple(float(v) for v in spacing)} mm grid: about "
                          f"{needed >> 20} MB to score, more than the budget of {budget >> 20} MB",
                          "check the voxel sizes in the header; if they are right, raise --max-volume-mb")


def finish_scan(loaded: Loaded, model: SliceModel, settings: ScoringSettings,
                calibration: Calibration | None = None, atlas: Any = None) -> ScanOutcome:
    """Model work, outputs written atomically; mask, flag and findings when a calibration is applied."""
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
            what = (f"the series does not say: {task.contrast_note}" if task.series is not None
                    else "the file name names none")
            warnings.append(f"contrast unknown ({what}): brightness counted as on T2/FLAIR; "
                            "pass --contrast t1 (or t2, flair) if that is wrong")
        outcome.details = ResultDetails(
            warnings=warnings, timings={"prepare_s": loaded.seconds, **maps.timings},
            brain_volume_ml=loaded.prepared.brain_volume_ml, n_slices=int(len(loaded.prepared.slices)),
            contrast=loaded.prepared.contrast,
            contrast_source=task.contrast_note if task.contrast_note and settings.preprocess.contrast == "auto"
            else None,
            stages=dict(loaded.prepared.stages))
        outcome.map_path = str(save_nifti(maps.anomaly, volume.affine, task.output("anomaly")))
        save_nifti(maps.brain_mask.astype(np.uint8), volume.affine, task.output("brain"), dtype=np.uint8)
        if maps.reconstruction is not None:
            outcome.recon_path = str(save_nifti(maps.reconstruction, volume.affine, task.output("recon")))
        if calibration is not None:
            _apply_calibration(outcome, maps, volume, calibration, atlas)
    except Exception as exc:  # noqa: BLE001 - reported per scan, the batch goes on
        return ScanOutcome(task, "failed", error=f"{task.path}: {failure_reason(exc, task.out_dir)}", facts=facts,
                           timing_s=loaded.seconds + time.perf_counter() - t0)
    outcome.timing_s = loaded.seconds + time.perf_counter() - t0
    return outcome


_DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied", errno.ENAMETOOLONG: "the file name is too long"}


def failure_reason(exc: BaseException, out_dir: Path) -> str:
    """One line saying why scoring a scan failed and what to do: write errors name the output folder and
    the fix (free space, permissions); anything else points at the model and settings."""
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        where = exc.filename or out_dir
        what = _DISK_ERRNOS[exc.errno]
        fix = {errno.ENOSPC: f"free space in {out_dir} (or choose another --out) and run the same command again",
               errno.EDQUOT: f"free space in {out_dir} (or choose another --out) and run the same command again",
               errno.EROFS: "choose a writable --out folder",
               errno.ENAMETOOLONG: "rename the input file to a shorter name"}.get(
                   exc.errno, f"make {out_dir} writable or choose another --out")
        return f"cannot write the outputs: {what} ({where}); {fix}"
    if isinstance(exc, MemoryError):
        return "out of memory while scoring; score it alone or on a machine with more memory"
    detail = traceback.format_exception_only(type(exc), exc)[-1].strip().replace("\n", " ")
    return f"scoring failed: {detail}; check the model and settings, or report it with this file"


def _apply_calibration(outcome: ScanOutcome, maps: ScanMaps, volume: Volume,
                       calibration: Calibration, atlas: Any) -> None:
    in_mni = False
    registration = maps.prepared.registration
    if atlas is not None and registration is not None:
        in_mni = True
    elif atlas is not None:
        from anomaly.atlas import is_mni_space

        in_mni = bool(is_mni_space(maps.brain_mask, volume.affine))
    applied = calibration.apply(maps.anomaly, maps.brain_mask, volume.affine, score=outcome.score, atlas=atlas,
                                in_mni=in_mni,
                                to_atlas=registration.native_to_template_points if registration is not None else None)
    outcome.mask_path = str(save_nifti(applied.mask.astype(np.uint8), volume.affine, outcome.task.output("mask"),
                                       dtype=np.uint8))
    outcome.flagged = applied.flagged
    outcome.findings = [f.to_dict() for f in applied.findings]
    outcome.details = dataclasses.replace(outcome.details, calibration=calibration.note(in_mni))


def score_scan(task: ScanTask, model: SliceModel, settings: ScoringSettings,
               calibration: Calibration | None = None, atlas: Any = None) -> ScanOutcome:
    """The whole per-scan work in one call (what a remote worker runs)."""
    return finish_scan(load_and_prepare(task, model, settings), model, settings, calibration, atlas)


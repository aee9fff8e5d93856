"""Calibration as a stored, versioned object: score the calibration scans through the batch (so they are
recorded and skipped when already scored), read their maps and brain masks back, find the thresholds
with :mod:`anomaly.calibration`, and save them with the data they came from.

Maps are read one at a time while the library pools their brain voxels: one float32 per brain voxel
of the calibration set up to 50 million of them (exact thresholds), fixed-size histograms read in a
second pass above that (:mod:`anomaly.pooled`), plus one map; never every map at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import nibabel as nib
import numpy as np
from nibabel.spatialimages import SpatialImage

from anomaly.calibration import Calibration, CalibrationError, calibrate_healthy, calibrate_labelled
from anomaly.config import ScoringSettings
from anomaly.models.base import SliceModel
from anomaly.outputs import sibling
from anomaly.pooled import DEFAULT_CAP
from anomaly.records import DEFAULT_MIN_VOLUME_ML, CalibrationData, CalibrationScan
from anomaly.store import Store, get_calibration, get_or_create_model, save_calibration
from anomaly.volume import Volume, file_sha256, is_nifti_path, load_mask, load_volume, scan_name
from pipelines.batch import BatchSummary, discover_inputs, score_batch, unique_stems

T = TypeVar("T")


class CalibrateError(RuntimeError):
    """A calibration set that cannot be used as given (failed scans, missing labels); the message says the fix."""


@dataclass(frozen=True)
class ScoredScan:
    """One calibration scan after scoring: its input, content hash, map, scored brain mask and scan score."""

    path: Path
    content_hash: str
    stem: str
    map_path: Path
    brain_path: Path
    score: float
    label_path: Path | None = None

    def record(self) -> CalibrationScan:
        """What the stored calibration keeps about this scan."""
        return CalibrationScan(path=str(self.path), content_hash=self.content_hash, name=self.stem, score=self.score,
                               label_path=None if self.label_path is None else str(self.label_path))


@dataclass
class CalibrationOutcome:
    """A stored calibration: its reference (``name@version``), the result and the scans it was made on."""

    ref: str
    calibration_id: int
    result: Calibration
    scans: list[ScoredScan]
    run_id: int
    out_dir: Path
    notes: list[str] = field(default_factory=list)


class LazySequence(Sequence[T]):
    """A sequence whose items are read from disk when asked for, so a pass over it holds one at a time."""

    def __init__(self, n: int, load: Callable[[int], T]) -> None:
        self._n = n
        self._load = load

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> T:  # type: ignore[override]
        if not isinstance(index, int):
            raise TypeError("LazySequence supports integer indices only")
        if index < 0:
            index += self._n
        if not 0 <= index < self._n:
            raise IndexError(index)
        return self._load(index)

    def __iter__(self) -> Iterator[T]:
        return (self._load(i) for i in range(self._n))


def map_grid(map_path: str | os.PathLike[str]) -> Volume:
    """The grid (shape and affine) of a written map as a data-free ``Volume``, to check masks against."""
    image = cast(SpatialImage, nib.load(str(map_path)))
    shape = tuple(int(s) for s in image.shape[:3])
    return Volume(data=np.broadcast_to(np.float32(0), shape), affine=np.asarray(image.affine, dtype=np.float64),
                  path=Path(map_path))


def load_map(scan: ScoredScan) -> np.ndarray:
    """The anomaly map of a scored scan as float32."""
    return load_volume(scan.map_path).data


def load_brain(scan: ScoredScan) -> np.ndarray:
    """The scored brain mask of a scan, checked to lie on the map's grid."""
    return load_mask(scan.brain_path, like=map_grid(scan.map_path))


def scored_scans(summary: BatchSummary) -> list[ScoredScan]:
    """The scans a batch produced maps for (first copy of repeated content only); refuses failed scans."""
    failed = [row for row in summary.rows if row["status"] == "failed"]
    if failed:
        listing = "; ".join(str(row["error"] or row["path"]) for row in failed[:5])
        more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
        raise CalibrateError(f"{len(failed)} calibration scan(s) failed to score: {listing}{more}; fix or remove "
                             "them from the inputs so the calibration set is exactly what you meant")
    scans = []
    for row in summary.rows:
        if not row.get("map_path"):
            continue  # same content as an earlier input: scored and counted once
        map_path = Path(row["map_path"])
        brain_path = sibling(map_path, "brain")
        if not brain_path.is_file():
            raise CalibrateError(f"{brain_path}: the scored brain mask of {row['path']} is missing (the map was "
                                 f"written by an older version); delete {map_path} and run the command again")
        scans.append(ScoredScan(path=Path(row["path"]), content_hash=str(row["scan_id"]),
                                stem=scan_name(map_path).removesuffix("_anomaly"), map_path=map_path,
                                brain_path=brain_path, score=float(row["score"])))
    if not scans:
        raise CalibrateError("no scan was scored; give the healthy scans to calibrate on")
    return scans


def label_index(labels_dir: str | os.PathLike[str]) -> dict[str, list[Path]]:
    """Label files under ``labels_dir`` by file name and by name without ``.nii``/``.nii.gz``."""
    folder = Path(labels_dir).expanduser().resolve()
    if not folder.is_dir():
        raise CalibrateError(f"{folder}: label folder not found; give the folder of ground-truth masks "
                             "named like the scans")
    index: dict[str, list[Path]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and is_nifti_path(p)):
        for key in {path.name, scan_name(path)}:
            index.setdefault(key, []).append(path)
    return index


def find_label(index: dict[str, list[Path]], stem: str, input_path: str | os.PathLike[str]) -> Path | None:
    """The label file named like a scan: ``<stem>.nii.gz``/``.nii`` or the scan's own file name."""
    for key in (stem, scan_name(input_path), Path(input_path).name):
        found = index.get(key)
        if found:
            unique = sorted(set(found))
            if len(unique) > 1:
                raise CalibrateError(f"several label files match {input_path}: {', '.join(map(str, unique))}; "
                                     "keep one label per scan name")
            return unique[0]
    return None


def _require_labels(scans: Sequence[tuple[str, Path]], index: dict[str, list[Path]],
                    labels_dir: str | os.PathLike[str] | None) -> None:
    missing = [str(path) for stem, path in scans if find_label(index, stem, path) is None]
    if missing:
        raise CalibrateError(f"no label file in {labels_dir} for {len(missing)} scan(s): "
                             f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; name each mask like "
                             "its scan (<name>.nii.gz), or pass --healthy-without-labels to count scans without "
                             "a label as lesion-free")


def default_out_dir(store_url: str, name: str) -> Path:
    """``<folder of the SQLite file>/calibration/<name>``, or ``./calibration/<name>`` for server databases."""
    from sqlalchemy.engine import make_url

    url = make_url(store_url)
    base = Path.cwd()
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        base = Path(url.database).parent
    return base / "calibration" / name


def calibrate_scans(scans: Sequence[ScoredScan], *, target_fpr: float | None, scan_target_fpr: float | None = None,
                    labelled: bool = False, n_bootstrap: int = 1000, seed: int = 0,
                    exact_cap: int = DEFAULT_CAP) -> Calibration:
    """Run the library calibration on scored scans, reading each map and mask from disk when it is needed
    (twice past ``exact_cap`` pooled voxels)."""
    n = len(scans)
    scores = [s.score for s in scans]
    maps = LazySequence(n, lambda i: load_map(scans[i]))
    masks = LazySequence(n, lambda i: load_brain(scans[i]))
    if not labelled:
        if target_fpr is None:
            raise CalibrateError("--target-fpr is required for a calibration on healthy scans (e.g. 0.01)")
        return calibrate_healthy(maps, masks, scores, target_fpr, scan_target_fpr, n_bootstrap=n_bootstrap,
                                 seed=seed, exact_cap=exact_cap)

    def label(i: int) -> np.ndarray:
        path = scans[i].label_path
        grid = map_grid(scans[i].map_path)
        if path is None:  # a scan declared healthy: no lesion anywhere
            return np.zeros(grid.shape, dtype=bool)
        return load_mask(path, like=grid)

    return calibrate_labelled(maps, masks, LazySequence(n, label), scan_scores=scores, exact_cap=exact_cap)


def run_calibration(inputs: Sequence[str | os.PathLike[str]], model: SliceModel, store: Store,
                    settings: ScoringSettings, *, name: str, target_fpr: float | None,
                    scan_target_fpr: float | None = None, labels_dir: str | os.PathLike[str] | None = None,
                    healthy_without_labels: bool = False, out_dir: str | os.PathLike[str] | None = None,
                    min_volume_ml: float = DEFAULT_MIN_VOLUME_ML, n_bootstrap: int = 1000, seed: int = 0,
                    progress: bool = True, brain_mask: str | os.PathLike[str] | None = None,
                    t1_for_mask: str = "auto", exact_cap: int = DEFAULT_CAP) -> CalibrationOutcome:
    """Score ``inputs`` with ``model`` and ``settings``, calibrate (healthy, or labelled with ``labels_dir``)
    and store the result as the next version of ``name``."""
    if not name or "@" in name or name != name.strip():
        raise CalibrateError(f"calibration name {name!r} must be non-empty, without '@' and surrounding spaces")
    if not (math.isfinite(min_volume_ml) and min_volume_ml >= 0):
        raise CalibrateError(f"--min-volume-ml {min_volume_ml!r} must be a number >= 0 (mL)")
    if n_bootstrap < 0:
        raise CalibrateError(f"--bootstrap {n_bootstrap} must be 0 (no confidence intervals) or positive")
    index = label_index(labels_dir) if labels_dir is not None else None
    if index is not None and not healthy_without_labels:  # refuse before spending time on scoring
        paths = discover_inputs(inputs)
        _require_labels([(stem, path) for stem, path in zip(unique_stems(paths), paths, strict=True)],
                        index, labels_dir)
    out = Path(out_dir).expanduser() if out_dir is not None else default_out_dir(store.engine.url.render_as_string(),
                                                                              name)
    summary = score_batch(inputs, out, model, store, settings, progress=progress, brain_mask=brain_mask,
                          t1_for_mask=t1_for_mask)
    scans = scored_scans(summary)
    notes: list[str] = []
    if index is not None:
        if not healthy_without_labels:
            _require_labels([(scan.stem, scan.path) for scan in scans], index, labels_dir)
        paired = [replace(scan, label_path=find_label(index, scan.stem, scan.path)) for scan in scans]
        unlabelled = sum(1 for s in paired if s.label_path is None)
        if unlabelled:
            notes.append(f"{unlabelled} scan(s) without a label file counted as lesion-free")
        scans = paired
        if target_fpr is not None or scan_target_fpr is not None:
            notes.append("--target-fpr/--scan-target-fpr are not used by a labelled calibration (it maximises "
                         "Dice; the scan threshold maximises sensitivity + specificity)")
    identity = model.identity()
    fingerprint = _fingerprint(scans, identity.weights_hash, settings.hash(), labelled=index is not None,
                               target_fpr=target_fpr, scan_target_fpr=scan_target_fpr,
                               min_volume_ml=min_volume_ml, n_bootstrap=n_bootstrap, seed=seed,
                               **({} if exact_cap == DEFAULT_CAP else {"exact_voxels": exact_cap}))
    with store.session() as s:
        latest = get_calibration(s, name)
        if latest is not None and CalibrationData.from_dict(latest.data).fingerprint == fingerprint:
            return CalibrationOutcome(
                ref=latest.ref, calibration_id=latest.id, result=Calibration.from_stored(latest),
                scans=list(scans), run_id=summary.run_id, out_dir=summary.out_dir,
                notes=[*notes, f"same scans, model and settings as {latest.ref}: reused it (no new version)"])
    result = calibrate_scans(scans, target_fpr=target_fpr, scan_target_fpr=scan_target_fpr,
                             labelled=index is not None, n_bootstrap=n_bootstrap, seed=seed, exact_cap=exact_cap)
    result = replace(result, min_volume_ml=float(min_volume_ml), settings_hash=settings.hash(),
                     settings=settings.to_dict())
    data = CalibrationData(
        min_volume_ml=result.min_volume_ml, settings=result.settings, fingerprint=fingerprint, model=identity.name,
        source="calibrate", run_id=summary.run_id, out_dir=str(summary.out_dir), scans=[s.record() for s in scans],
        n_scans=len(scans),
        labels_dir=str(Path(labels_dir).expanduser().resolve()) if labels_dir is not None else None)
    with store.session() as s:
        model_row = get_or_create_model(s, identity.name, identity.weights_hash, identity.config)
        cal = save_calibration(s, name, model_row, result.method, result.voxel_threshold,
                               scan_threshold=result.scan_threshold, target_fpr=result.target_fpr,
                               settings_hash=result.settings_hash, data=data.to_dict(), metrics=result.metrics)
        ref, cal_id = cal.ref, cal.id
    return CalibrationOutcome(ref=ref, calibration_id=cal_id, result=replace(result, ref=ref), scans=list(scans),
                              run_id=summary.run_id, out_dir=summary.out_dir, notes=notes)


def _fingerprint(scans: Sequence[ScoredScan], weights_hash: str, settings_hash: str, **options: Any) -> str:
    """Identity of a calibration's inputs: re-running the same calibration reuses the stored version."""
    labels = [file_sha256(s.label_path) if s.label_path is not None else "" for s in scans]
    payload = {"scans": sorted(zip((s.content_hash for s in scans), labels, strict=True)),
               "model": weights_hash, "settings": settings_hash, **options}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


__all__ = [
    "CalibrateError", "CalibrationError", "CalibrationOutcome", "LazySequence", "ScoredScan", "calibrate_scans",
    "default_out_dir", "find_label", "label_index", "load_brain", "load_map", "map_grid", "run_calibration",
    "scored_scans",
]

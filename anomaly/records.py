"""Typed records of what is stored as JSON by one layer and read by another: a result's details
(``Result.details``) and a calibration's data (``Calibration.data``).

Writers build a record and store ``record.to_dict()``; readers call ``Record.from_dict(row.details)``
and use attributes, never string keys. Reading is lenient (see :mod:`anomaly.configparse`): a row
written by an older or newer version gives a record with defaults where keys are missing or odd.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from anomaly.configparse import build, parsed_fields
from anomaly.jsonio import to_jsonable

R = TypeVar("R", bound="Record")

DEFAULT_MIN_VOLUME_ML = 0.05
"""Smallest finding kept (mL) unless a calibration says otherwise; the one place this number lives."""


class Record:
    """Mixin of the stored records: ``to_dict`` (JSON-ready, every field, ``None`` as null) and lenient
    ``from_dict``."""

    def to_dict(self) -> dict[str, Any]:
        assert dataclasses.is_dataclass(self)
        return to_jsonable({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    @classmethod
    def from_dict(cls: type[R], data: Mapping[str, Any] | None) -> R:
        return build(cls, data if isinstance(data, Mapping) else {}, lenient=True)


@dataclass(frozen=True)
class AppliedCalibrationNote(Record):
    """Which calibration a result was scored with, and whether its findings could be named by atlas region."""

    name: str = ""
    voxel_threshold: float | None = None
    scan_threshold: float | None = None
    min_volume_ml: float | None = None
    in_mni: bool = False


@dataclass(frozen=True)
class ResultDetails(Record):
    """``Result.details``: warnings, timings, facts of the preprocessing stages, the contrast scored as, the
    calibration applied, and the label mask an evaluation paired with the scan.

    ``stages`` (skull stripping, registration: see :func:`anomaly.preprocess.prepare_scan`) are stored at
    the top level of the JSON, beside the named keys, as earlier versions did; every key that is not a
    field is read back into ``stages``."""

    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    brain_volume_ml: float | None = None
    n_slices: int | None = None
    contrast: str | None = None
    contrast_source: str | None = None
    calibration: AppliedCalibrationNote | None = None
    label_path: str | None = None
    stages: dict[str, Any] = field(default_factory=dict, metadata={"parse": False})

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        stages = out.pop("stages", {})
        return {**stages, **out}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ResultDetails:
        data = data if isinstance(data, Mapping) else {}
        record = build(cls, data, lenient=True)
        names = {f.name for f in parsed_fields(cls)}
        stages = {str(k): v for k, v in data.items() if k not in names}
        return dataclasses.replace(record, stages=stages) if stages else record


@dataclass(frozen=True)
class CalibrationScan(Record):
    """One scan a calibration was made on."""

    path: str
    content_hash: str
    name: str
    score: float | None = None
    label_path: str | None = None


@dataclass(frozen=True)
class CalibrationData(Record):
    """``Calibration.data``: how a calibration applies (smallest finding, the scoring settings its maps were
    made with) and where it came from (scans, run, output folder, labels; or the dashboard and reviewer)."""

    min_volume_ml: float = DEFAULT_MIN_VOLUME_ML
    settings: dict[str, Any] | None = None
    fingerprint: str | None = None
    model: str | None = None
    source: str | None = None
    run_id: int | None = None
    out_dir: str | None = None
    scans: list[CalibrationScan] = field(default_factory=list)
    n_scans: int | None = None
    labels_dir: str | None = None
    reviewer: str | None = None
    scan_labels: str | None = None

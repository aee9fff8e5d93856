"""Where a scan came from (a NIfTI file, a DICOM series, a BIDS image): identity columns of ``scans``.

Identifiers users join on (StudyInstanceUID, SeriesInstanceUID) are indexed columns; acquisition facts
that vary by source (sequence, TR/TE/TI, BIDS entities, the contrast read from them) are JSON. Patient
names and IDs are never stored, only a salted hash made by the reader.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from anomaly.store.schema import Scan

SOURCE_FIELDS: tuple[str, ...] = ("source", "study_uid", "series_uid", "series_description", "acquisition_date",
                                  "patient_hash", "source_meta")
SOURCES: tuple[str, ...] = ("nifti", "dicom", "bids")
_FORBIDDEN = ("patientname", "patientid", "patient_name", "patient_id", "patientbirthdate")


def set_scan_source(s: Session, scan: Scan, facts: Mapping[str, Any]) -> Scan:
    """Record the scan's source facts (keys of ``SOURCE_FIELDS``; other keys are an error)."""
    unknown = sorted(set(facts) - set(SOURCE_FIELDS))
    if unknown:
        raise ValueError(f"unknown scan source field(s) {unknown}; known: {', '.join(SOURCE_FIELDS)}")
    if facts.get("source") is not None and facts["source"] not in SOURCES:
        raise ValueError(f"scan source must be one of {', '.join(SOURCES)}, not {facts['source']!r}")
    meta = facts.get("source_meta")
    if isinstance(meta, Mapping):
        leaked = [k for k in meta if str(k).lower().replace(" ", "") in _FORBIDDEN]
        if leaked:
            raise ValueError(f"patient identifiers {leaked} must not be stored; keep a salted hash instead")
    for key, value in facts.items():
        if getattr(scan, key) != value:
            setattr(scan, key, value)
    return scan


def scans_of_series(s: Session, series_uid: str) -> list[Scan]:
    """The scans converted from the DICOM series with this SeriesInstanceUID."""
    return list(s.scalars(select(Scan).where(Scan.series_uid == series_uid).order_by(Scan.id)))

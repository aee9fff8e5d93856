"""Calibrations: versioned names (``demo@2``), saving the next version safely under concurrency, look-ups."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, joinedload

from anomaly.jsonio import to_jsonable
from anomaly.store.dialect import lock_name, record_id
from anomaly.store.schema import CALIBRATION_METHODS, Calibration, Model, utcnow

_CALIBRATION_REF = re.compile(r"^(?P<name>[^@\s][^@]*?)(?:@(?P<version>[^@]*))?$")
_CALIBRATION_LOCK_SPACE = 731_024_862  # first key of the two-int4 advisory locks on calibration names


def parse_calibration_ref(ref: str) -> tuple[str, int | None]:
    """Split ``"name"``, ``"name@3"`` or ``"name@latest"`` into (name, version or None for the latest)."""
    match = _CALIBRATION_REF.match(ref.strip()) if ref else None
    if match is None:
        raise ValueError(f"calibration reference {ref!r} is not 'NAME' or 'NAME@VERSION' (e.g. 'healthy@2')")
    name, version = match.group("name").strip(), match.group("version")
    if version is None or version.strip().lower() in ("", "latest"):
        return name, None
    if not version.strip().isdigit() or int(version) < 1:
        raise ValueError(f"calibration reference {ref!r}: version {version!r} is not a positive whole number")
    return name, int(version)


def save_calibration(
    s: Session,
    name: str,
    model: Model | int,
    method: str,
    voxel_threshold: float,
    scan_threshold: float | None = None,
    target_fpr: float | None = None,
    settings_hash: str | None = None,
    data: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> Calibration:
    """Store a calibration as the next version of ``name`` (1 for a new name).

    Two processes calibrating one name at once get consecutive versions: the version is read under a
    lock on the name (see :func:`anomaly.store.dialect.lock_name`)."""
    if not name or "@" in name or name != name.strip():
        raise ValueError(f"calibration name {name!r} must be non-empty, without '@' and surrounding spaces")
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration {name!r}: method {method!r} is not one of {list(CALIBRATION_METHODS)}")
    if not math.isfinite(float(voxel_threshold)):
        raise ValueError(f"calibration {name!r}: voxel threshold {voxel_threshold!r} is not a finite number")
    lock_name(s, Calibration.__table__, _CALIBRATION_LOCK_SPACE, name)  # type: ignore[arg-type]
    last = s.execute(select(func.max(Calibration.version)).where(Calibration.name == name)).scalar_one()
    calibration = Calibration(
        name=name,
        version=int(last or 0) + 1,
        model_id=record_id(model, "model"),
        method=method,
        voxel_threshold=float(voxel_threshold),
        scan_threshold=None if scan_threshold is None else float(scan_threshold),
        target_fpr=None if target_fpr is None else float(target_fpr),
        settings_hash=settings_hash,
        data=to_jsonable(dict(data or {})),
        metrics=to_jsonable(dict(metrics or {})),
        created_at=utcnow(),
    )
    s.add(calibration)
    s.flush()
    return calibration


def get_calibration(s: Session, name: str, version: int | None = None) -> Calibration | None:
    """Calibration ``name`` at ``version`` (latest when None); ``name`` may also be ``"name@3"``."""
    if version is None:
        name, version = parse_calibration_ref(name)
    stmt = select(Calibration).options(joinedload(Calibration.model)).where(Calibration.name == name)
    stmt = (
        stmt.where(Calibration.version == version)
        if version is not None
        else stmt.order_by(Calibration.version.desc())
    )
    return s.scalars(stmt.limit(1)).first()


def list_calibrations(s: Session, model: Model | int | None = None) -> list[Calibration]:
    """All calibrations (of ``model`` when given), by name then version."""
    stmt = (
        select(Calibration)
        .options(joinedload(Calibration.model))
        .order_by(Calibration.name, Calibration.version)
    )
    if model is not None:
        stmt = stmt.where(Calibration.model_id == record_id(model, "model"))
    return list(s.scalars(stmt))

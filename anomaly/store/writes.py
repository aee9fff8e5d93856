"""Writes of the scoring side: get-or-create of models and scans, runs, claimed output names and results.

Every function takes an open ``Session`` first and never commits; the caller's ``Store.session()``
block does. Writing a result also keeps the copies listings read (the scan's name and the number of
findings on the result) and the run's counts up to date, so no page has to count a whole run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Integer, case, cast, func, select, update
from sqlalchemy.orm import Session, joinedload

from anomaly.jsonio import to_jsonable
from anomaly.store.dialect import NotFoundError, insert_ignore, record_id
from anomaly.store.schema import (
    RESULT_STATUSES,
    Finding,
    Model,
    OutputName,
    Result,
    Review,
    Run,
    Scan,
    utcnow,
)

FINDING_FIELDS: tuple[str, ...] = (
    "rank", "n_voxels", "volume_ml", "centroid_x", "centroid_y", "centroid_z",
    "peak_x", "peak_y", "peak_z", "peak", "mean", "region_centroid", "region_majority", "atlas",
)  # fmt: skip
"""Keys of a finding dict given to ``upsert_result`` (``centroid_mm``/``peak_mm`` 3-sequences also accepted)."""

_OPTIONAL_FINDING_FIELDS = {"rank", "region_centroid", "region_majority", "atlas"}
_CHUNK = 500  # values per IN (...) list: well below SQLite's and PostgreSQL's parameter limits


def get_or_create_model(
    s: Session, name: str, weights_hash: str, config: Mapping[str, Any] | None = None
) -> Model:
    """The model row for (``name``, ``weights_hash``), created with ``config`` when new."""
    if not name or not weights_hash:
        raise ValueError(
            f"a model needs a name and a weights hash, got name={name!r}, weights_hash={weights_hash!r}"
        )
    stmt = select(Model).where(Model.name == name, Model.weights_hash == weights_hash)
    model = s.scalars(stmt).one_or_none()
    if model is None:
        values = {"name": name, "weights_hash": weights_hash, "config": to_jsonable(dict(config or {})),
                  "created_at": utcnow()}
        insert_ignore(s, Model.__table__, values, ("name", "weights_hash"))  # type: ignore[arg-type]
        model = s.scalars(stmt).one()
    return model


def get_or_create_scan(
    s: Session,
    content_hash: str,
    path: str | os.PathLike[str],
    name: str,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    orientation: str | None = None,
    dtype: str | None = None,
    *,
    known: Scan | None = None,
) -> Scan:
    """The scan with this content hash; created when new, else its path, name and the given facts updated.

    ``known`` is the scan already read for this hash (e.g. by :func:`scans_by_hash`), which saves the look-up."""
    if not content_hash or len(content_hash) > 64:
        raise ValueError(
            f"scan {os.fspath(path)!r}: content hash {content_hash!r} is not a SHA-256 hex digest "
            "(expected at most 64 characters)"
        )
    facts: dict[str, Any] = {"path": os.fspath(path), "name": name}
    if shape is not None:
        facts["shape"] = [int(v) for v in shape]
    if spacing is not None:
        facts["spacing"] = [float(v) for v in spacing]
    if orientation is not None:
        facts["orientation"] = str(orientation)
    if dtype is not None:
        facts["dtype"] = str(dtype)
    stmt = select(Scan).where(Scan.content_hash == content_hash)
    scan = known if known is not None and known.content_hash == content_hash else s.scalars(stmt).one_or_none()
    if scan is None:
        insert_ignore(s, Scan.__table__, {"content_hash": content_hash, "created_at": utcnow(), **facts},  # type: ignore[arg-type]
                      ("content_hash",))
        scan = s.scalars(stmt).one()
    for key, value in facts.items():
        if getattr(scan, key) != value:
            setattr(scan, key, value)
    return scan


def scans_by_hash(s: Session, content_hashes: Iterable[str]) -> dict[str, Scan]:
    """The scans already recorded among these content hashes, by hash (a few set queries, not one per scan)."""
    wanted = sorted(set(content_hashes))
    found: dict[str, Scan] = {}
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start : start + _CHUNK]
        found.update((scan.content_hash, scan) for scan in s.scalars(select(Scan).where(Scan.content_hash.in_(chunk))))
    return found


def open_run(
    s: Session,
    model: Model | int,
    settings: Mapping[str, Any],
    settings_hash: str,
    out_dir: str | os.PathLike[str],
    calibration: Any = None,
    executor: str = "local",
) -> Run:
    """The run for (model, settings hash, output folder, calibration), so a repeated or interrupted
    batch continues it; created when none exists. A reopened run is marked unfinished."""
    model_id = record_id(model, "model")
    calibration_id = None if calibration is None else record_id(calibration, "calibration")
    out = os.path.abspath(os.fspath(out_dir))
    stmt = (
        select(Run)
        .where(
            Run.model_id == model_id,
            Run.settings_hash == settings_hash,
            Run.out_dir == out,
            Run.calibration_id.is_(None) if calibration_id is None else Run.calibration_id == calibration_id,
        )
        .order_by(Run.id.desc())
        .limit(1)
    )
    run = s.scalars(stmt).first()
    if run is not None:
        run.finished_at = None
        return run
    run = Run(
        model_id=model_id, settings=to_jsonable(dict(settings)), settings_hash=settings_hash, out_dir=out,
        calibration_id=calibration_id, started_at=utcnow(), executor=executor, n_scored=0, n_failed=0,
        n_skipped=0, n_flagged=0, n_reviewed=0, n_findings=0, n_reviews=0, n_timed=0, timing_total_s=0.0, version=0,
    )  # fmt: skip
    s.add(run)
    s.flush()
    return run


def get_run(s: Session, run_id: int) -> Run:
    """The run with this id (model and calibration loaded), or NotFoundError."""
    run = s.get(Run, run_id, options=[joinedload(Run.model), joinedload(Run.calibration)])
    if run is None:
        raise NotFoundError(f"run {run_id} does not exist in this database; list runs with list_runs()")
    return run


def latest_run_id(s: Session) -> int | None:
    """The id of the newest run, or None in an empty database."""
    return s.execute(select(func.max(Run.id))).scalar_one()


def get_result(s: Session, run: Run | int, scan: Scan | int) -> Result | None:
    """The result of ``scan`` in ``run``, or None when not scored there yet."""
    stmt = select(Result).where(Result.run_id == record_id(run, "run"), Result.scan_id == record_id(scan, "scan"))
    return s.scalars(stmt).one_or_none()


@dataclass(frozen=True)
class ScoredState:
    """What a batch needs to know to skip a scan already scored in a run."""

    scan_id: int
    status: str
    score: float | None
    flagged: bool | None
    map_path: str | None
    mask_path: str | None
    recon_path: str | None
    n_findings: int
    stem: str | None


def scored_states(s: Session, run: Run | int, scan_ids: Iterable[int]) -> dict[int, ScoredState]:
    """Result and claimed output stem of each of these scans in ``run``, by scan id (set queries)."""
    run_id = record_id(run, "run")
    wanted = sorted(set(scan_ids))
    stems: dict[int, str] = {}
    states: dict[int, ScoredState] = {}
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start : start + _CHUNK]
        stems.update(s.execute(select(OutputName.scan_id, OutputName.stem).where(
            OutputName.run_id == run_id, OutputName.scan_id.in_(chunk))).all())
        stmt = select(Result.scan_id, Result.status, Result.score, Result.flagged, Result.map_path, Result.mask_path,
                      Result.recon_path, Result.n_findings).where(Result.run_id == run_id, Result.scan_id.in_(chunk))
        for row in s.execute(stmt):
            states[row.scan_id] = ScoredState(stem=None, **row._mapping)
    for scan_id in wanted:
        if scan_id in stems:
            old = states.get(scan_id)
            states[scan_id] = (ScoredState(scan_id, "", None, None, None, None, None, 0, stems[scan_id]) if old is None
                               else ScoredState(**{**old.__dict__, "stem": stems[scan_id]}))
    return states


def claimed_stem(s: Session, run: Run | int, scan: Scan | int) -> str | None:
    """The output stem ``scan`` holds in ``run``'s folder, or None when it has claimed none."""
    stmt = select(OutputName.stem).where(OutputName.run_id == record_id(run, "run"),
                                         OutputName.scan_id == record_id(scan, "scan"))
    return s.scalars(stmt).one_or_none()


def claim_output_name(
    s: Session,
    run: Run | int,
    scan: Scan | int,
    out_dir: str | os.PathLike[str],
    candidates: Iterable[str],
    in_use: Callable[[str], bool] = lambda stem: False,
    *,
    held: str | None = None,
) -> str:
    """Claim the first free stem among ``candidates`` for the outputs of ``scan`` in ``run`` (in
    ``out_dir``): free means no other (run, scan) holds it in this database and ``in_use(stem)`` is
    False (e.g. no such file on disk). A scan that already holds a stem in this run keeps it (``held``:
    that stem when the caller has read it already). Safe when several processes claim at once (a unique
    key; the loser tries the next candidate)."""
    from anomaly.outputs import output_key

    run_id, scan_id = record_id(run, "run"), record_id(scan, "scan")
    held = held if held is not None else claimed_stem(s, run_id, scan_id)
    if held is not None:
        return held
    folder = os.fspath(out_dir)
    for stem in candidates:
        key = output_key(folder, stem)
        if s.scalars(select(OutputName.id).where(OutputName.key == key)).first() is not None or in_use(stem):
            continue
        values = {"key": key, "out_dir": folder, "stem": stem, "run_id": run_id, "scan_id": scan_id,
                  "created_at": utcnow()}
        insert_ignore(s, OutputName.__table__, values)  # type: ignore[arg-type]
        held = claimed_stem(s, run_id, scan_id)
        if held is not None:
            return held
    raise RuntimeError("no free output name")  # pragma: no cover - the candidates never end


def _finding_from_dict(data: Mapping[str, Any], default_rank: int, where: str) -> Finding:
    values = dict(data)
    for alias, prefix in (("centroid_mm", "centroid"), ("peak_mm", "peak")):
        if alias in values:
            xyz = values.pop(alias)
            if xyz is None or len(xyz) != 3:
                raise ValueError(f"{where}: '{alias}' must be 3 world coordinates in mm, got {xyz!r}")
            for axis, v in zip("xyz", xyz, strict=True):
                values[f"{prefix}_{axis}"] = v
    unknown = sorted(set(values) - set(FINDING_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; a finding takes {list(FINDING_FIELDS)}")
    missing = sorted(set(FINDING_FIELDS) - _OPTIONAL_FINDING_FIELDS - set(values))
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    values.setdefault("rank", default_rank)
    converted: dict[str, Any] = {}
    for key, v in values.items():
        if key in ("rank", "n_voxels"):
            converted[key] = int(v)
        elif key in ("region_centroid", "region_majority", "atlas"):
            converted[key] = None if v is None else str(v)
        else:
            converted[key] = float(v)
    return Finding(**converted)


@dataclass(frozen=True)
class _Counted:
    """The part of a result a run's counts depend on."""

    ok: int = 0
    failed: int = 0
    flagged: int = 0
    reviewed_ok: int = 0
    findings: int = 0
    timed: int = 0
    timing: float = 0.0

    @classmethod
    def of(cls, result: Result) -> _Counted:
        ok = int(result.status == "ok")
        return cls(ok=ok, failed=int(result.status == "failed"), flagged=int(bool(result.flagged)),
                   reviewed_ok=ok * int(result.verdict is not None), findings=int(result.n_findings or 0),
                   timed=int(result.timing_s is not None), timing=float(result.timing_s or 0.0))


def _add_to_run_counts(s: Session, run_id: int, old: _Counted, new: _Counted) -> None:
    """Move the run's counts from ``old`` to ``new`` for one result (an atomic UPDATE ... SET n = n + d)."""
    deltas = {
        "n_scored": new.ok - old.ok, "n_failed": new.failed - old.failed, "n_flagged": new.flagged - old.flagged,
        "n_reviewed": new.reviewed_ok - old.reviewed_ok, "n_findings": new.findings - old.findings,
        "n_timed": new.timed - old.timed, "timing_total_s": new.timing - old.timing,
    }  # fmt: skip
    values = {name: getattr(Run, name) + delta for name, delta in deltas.items() if delta}
    values["version"] = Run.version + 1
    s.execute(update(Run).where(Run.id == run_id).values(values).execution_options(synchronize_session=False))


def upsert_result(
    s: Session,
    run: Run | int,
    scan: Scan | int,
    *,
    status: str,
    input_path: str | os.PathLike[str],
    error: str | None = None,
    score: float | None = None,
    flagged: bool | None = None,
    map_path: str | os.PathLike[str] | None = None,
    recon_path: str | os.PathLike[str] | None = None,
    mask_path: str | os.PathLike[str] | None = None,
    timing_s: float | None = None,
    details: Mapping[str, Any] | None = None,
    findings: Iterable[Mapping[str, Any]] | None = None,
) -> Result:
    """Record the outcome of ``scan`` in ``run``: one row per (run, scan), updated in place; all
    fields and the findings are replaced by the given ones (reviews are kept)."""
    if status not in RESULT_STATUSES:
        raise ValueError(
            f"result status {status!r} for {os.fspath(input_path)!r} is not one of {list(RESULT_STATUSES)}"
        )
    run_id, scan_id = record_id(run, "run"), record_id(scan, "scan")
    where = f"result of {os.fspath(input_path)!r} in run {run_id}"
    new_findings = [
        _finding_from_dict(f, i + 1, f"{where}, finding {i + 1}") for i, f in enumerate(findings or [])
    ]
    scan_row = scan if isinstance(scan, Scan) else s.get(Scan, scan_id)
    now = utcnow()
    result = get_result(s, run_id, scan_id)
    old = _Counted()
    if result is None:
        values = {"run_id": run_id, "scan_id": scan_id, "status": status, "input_path": os.fspath(input_path),
                  "details": {}, "created_at": now, "updated_at": now, "n_findings": 0}
        insert_ignore(s, Result.__table__, values, ("run_id", "scan_id"))  # type: ignore[arg-type]
        result = get_result(s, run_id, scan_id)
        assert result is not None  # (a row another process inserted at the same moment counts once more
        # here; finish_run counts afresh)
    else:
        old = _Counted.of(result)
    result.status = status
    result.input_path = os.fspath(input_path)
    result.error = error
    result.score = None if score is None else float(score)
    result.flagged = None if flagged is None else bool(flagged)
    result.map_path = None if map_path is None else os.fspath(map_path)
    result.recon_path = None if recon_path is None else os.fspath(recon_path)
    result.mask_path = None if mask_path is None else os.fspath(mask_path)
    result.timing_s = None if timing_s is None else float(timing_s)
    result.details = to_jsonable(dict(details or {}))
    result.updated_at = now
    result.findings = new_findings
    result.n_findings = len(new_findings)
    result.scan_name = None if scan_row is None else scan_row.name
    s.flush()
    _add_to_run_counts(s, run_id, old, _Counted.of(result))
    return result


def _recount(s: Session, run_id: int) -> dict[str, Any]:
    """The run's counts from its rows (one aggregate over the run's results, one over its reviews)."""
    ok, failed = Result.status == "ok", Result.status == "failed"
    stmt = select(
        func.coalesce(func.sum(case((ok, 1), else_=0)), 0).label("n_scored"),
        func.coalesce(func.sum(case((failed, 1), else_=0)), 0).label("n_failed"),
        func.coalesce(func.sum(case((Result.flagged.is_(True), 1), else_=0)), 0).label("n_flagged"),
        func.coalesce(func.sum(case((ok & Result.verdict.is_not(None), 1), else_=0)), 0).label("n_reviewed"),
        func.coalesce(func.sum(Result.n_findings), 0).label("n_findings"),
        func.count(Result.timing_s).label("n_timed"),
        func.coalesce(func.sum(Result.timing_s), 0.0).label("timing_total_s"),
    ).where(Result.run_id == run_id)
    counts = dict(s.execute(stmt).one()._mapping)
    counts["n_reviews"] = s.execute(select(func.count(Review.id)).join(Result, Result.id == Review.result_id)
                                    .where(Result.run_id == run_id)).scalar_one()
    return {k: float(v) if k == "timing_total_s" else int(v) for k, v in counts.items()}


def finish_run(s: Session, run: Run | int, *, n_skipped: int | None = None) -> Run:
    """Mark ``run`` finished now and count its results afresh (``n_skipped`` kept unless given)."""
    run_obj = run if isinstance(run, Run) else get_run(s, run)
    s.flush()
    for name, value in _recount(s, run_obj.id).items():
        setattr(run_obj, name, value)
    run_obj.version = (run_obj.version or 0) + 1
    if n_skipped is not None:
        run_obj.n_skipped = int(n_skipped)
    run_obj.finished_at = utcnow()
    s.flush()
    return run_obj


def refresh_run(s: Session, run: Run | int) -> Run:
    """Rebuild the copies on the run's results (scan name, number of findings, latest review) and its
    counts from the rows, e.g. after rows were inserted in bulk without this API (set statements)."""
    run_id = record_id(run, "run")
    s.flush()
    latest = (select(Review.id).where(Review.result_id == Result.id)
              .order_by(Review.created_at.desc(), Review.id.desc()).limit(1).scalar_subquery())
    s.execute(update(Result).where(Result.run_id == run_id).values(
        scan_name=select(Scan.name).where(Scan.id == Result.scan_id).scalar_subquery(),
        n_findings=select(cast(func.count(Finding.id), Integer)).where(Finding.result_id == Result.id)
        .scalar_subquery(),
        review_id=latest,
    ).execution_options(synchronize_session=False))
    s.execute(update(Result).where(Result.run_id == run_id).values(
        verdict=select(Review.verdict).where(Review.id == Result.review_id).scalar_subquery(),
        reviewer=select(Review.reviewer).where(Review.id == Result.review_id).scalar_subquery(),
        reviewed_at=select(Review.created_at).where(Review.id == Result.review_id).scalar_subquery(),
    ).execution_options(synchronize_session=False))
    s.expire_all()
    run_obj = get_run(s, run_id)
    for name, value in _recount(s, run_id).items():
        setattr(run_obj, name, value)
    run_obj.version = (run_obj.version or 0) + 1
    s.flush()
    return run_obj



def merge_result_details(s: Session, run: Run | int, by_input_path: Mapping[str, Mapping[str, Any]]) -> int:
    """Merge keys into the details of the run's results named by input path (set queries, a chunk of paths
    at a time); returns how many results were updated."""
    run_id = record_id(run, "run")
    paths = sorted(by_input_path)
    updated = 0
    for start in range(0, len(paths), _CHUNK):
        chunk = paths[start : start + _CHUNK]
        for result in s.scalars(select(Result).where(Result.run_id == run_id, Result.input_path.in_(chunk))):
            result.details = {**(result.details or {}), **to_jsonable(dict(by_input_path[result.input_path]))}
            updated += 1
    s.execute(update(Run).where(Run.id == run_id).values(version=Run.version + 1)
              .execution_options(synchronize_session=False))
    s.flush()
    return updated

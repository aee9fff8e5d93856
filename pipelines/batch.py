"""Batch scoring of files and folders into maps, a database and a CSV (the ``anomaly score`` verb).

Resumable: scans are keyed by content hash; a scan already scored in the same run (same model,
settings, output folder and calibration) is skipped; each result is committed as soon as it is made,
so an interruption loses at most the scan in hand. One bad file never stops the batch.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from anomaly.calibration import Calibration
from anomaly.config import ScoringSettings
from anomaly.fileio import IS_FOLDER, atomic_path, path_problem, says_what_to_do
from anomaly.io.dicom import DicomSeries, find_series, is_zip_archive, looks_like_dicom
from anomaly.models.base import SliceModel
from anomaly.outputs import KINDS, output_path, outputs_present, stem_candidates
from anomaly.store import (
    Model,
    Store,
    claim_output_name,
    finish_run,
    get_calibration,
    get_or_create_model,
    get_or_create_scan,
    open_run,
    parse_calibration_ref,
    scans_by_hash,
    scored_states,
    upsert_result,
)
from anomaly.store.sources import set_scan_source
from anomaly.volume import file_sha256, is_nifti_path, scan_name
from pipelines.executors import Executor, LocalExecutor
from pipelines.work import ScanOutcome, ScanTask

CSV_COLUMNS = ("path", "scan_id", "status", "score", "map_path", "error", "flagged", "calibration",
               "mask_path", "recon_path", "n_findings", "timing_s", "warnings", "run_id", "series_uid")


class BatchError(RuntimeError):
    """A problem with the batch as a whole (no inputs, unknown calibration); the message says the fix."""


@dataclass
class Discovery:
    """What the inputs hold: scan files to score, entries that look like scans but cannot be read
    (``problems``, each a failed row) and other skipped entries (``notes``), each with its reason."""

    paths: list[Path] = field(default_factory=list)
    problems: list[tuple[Path, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


_PAIR_SUFFIXES = (".hdr", ".hdr.gz")
_HINT_UNREADABLE = "give a regular .nii/.nii.gz file"
_HINT_PAIR = ("convert the pair to one .nii.gz file, e.g. nib.save(nib.load('scan.hdr'), 'scan.nii.gz'), "
              "and score that")


def _unreadable(problem: str) -> str:
    """The reason a file is skipped, with what to do where the problem does not already say it."""
    return problem if says_what_to_do(problem) else f"{problem}; {_HINT_UNREADABLE}"


def find_inputs(inputs: Sequence[str | os.PathLike[str]]) -> Discovery:
    """Files as given, and ``.nii``/``.nii.gz`` files found recursively in folders, in a stable order, as
    absolute paths that keep symbolic links (a file reached twice is listed once, first as found).

    Nothing is opened: FIFOs, devices, sockets, dangling or looping links and folders named like scans
    are reported with their reason, never read. A missing input raises :class:`BatchError`."""
    found = Discovery()
    seen_dirs: set[tuple[int, int]] = set()
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            _walk(path, found, seen_dirs)
            continue
        problem = path_problem(path)
        if problem is None:
            found.paths.append(path)
        elif os.path.lexists(path) and problem != "file not found":
            found.problems.append((path, _unreadable(problem)))
        else:
            raise BatchError(f"{path}: no such file or folder; check the input path")
    # one entry per file (a link and its target count once), named as given: a link's own name is the
    # scan's name (datalad and git-annex datasets link every file to a content-addressed key)
    unique: dict[Path, Path] = {}
    for p in found.paths:
        unique.setdefault(p.resolve(), Path(os.path.abspath(p)))
    found.paths = list(unique.values())
    return found


def _walk(folder: Path, found: Discovery, seen_dirs: set[tuple[int, int]]) -> None:
    """Search ``folder`` (following links to folders once each, hidden folders left out) and sort every entry
    into ``found``."""
    try:
        info = folder.stat()
        if (info.st_dev, info.st_ino) in seen_dirs:
            found.notes.append(f"{folder}: folder already searched (a symbolic link loops back to it); skipped")
            return
        seen_dirs.add((info.st_dev, info.st_ino))
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        found.notes.append(f"{folder}: cannot list the folder ({exc.strerror or exc}); skipped")
        return
    pairs: set[str] = set()
    for entry in entries:
        path = Path(entry.path)
        name = entry.name.lower()
        problem = path_problem(path)
        named_scan = is_nifti_path(path)
        if problem == IS_FOLDER:
            if entry.name.startswith("."):  # .git (a datalad dataset's annexed contents), .datalad, caches
                found.notes.append(f"{path}: hidden folder, not searched; give it as an input to score what it holds")
                continue
            if named_scan:
                found.notes.append(f"{path}: a folder named like a NIfTI file; searched as a folder")
            _walk(path, found, seen_dirs)
        elif problem is None and named_scan:
            found.paths.append(path)
        elif problem is None and name.endswith(_PAIR_SUFFIXES):
            stem = path.name[: -len(next(x for x in _PAIR_SUFFIXES if name.endswith(x)))]
            if stem not in pairs:
                pairs.add(stem)
                found.problems.append((path, f"half of an Analyze/NIfTI .hdr/.img pair, not a single-file NIfTI; "
                                             f"{_HINT_PAIR}"))
        elif problem is not None and (named_scan or entry.is_symlink()):
            reason = _unreadable(problem)
            if named_scan:
                found.problems.append((path, reason))
            else:
                found.notes.append(f"{path}: {problem}; skipped")


def discover_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The scan files among ``inputs`` (see :func:`find_inputs`; unreadable entries left out)."""
    return find_inputs(inputs).paths


def unique_stems(paths: Sequence[Path]) -> list[str]:
    """Output stems: the file name without ``.nii``/``.nii.gz``; where names repeat (``*/flair.nii.gz``),
    parent folder names are prefixed until each stem is unique (``patient07_flair``)."""
    stems = [scan_name(p) for p in paths]
    depth = 0
    while len(set(stems)) < len(stems) and depth < 64:
        depth += 1
        counts = Counter(stems)
        stems = [
            "_".join([*p.parent.parts[-depth:], scan_name(p)]) if counts[s] > 1 else s
            for p, s in zip(paths, stems, strict=True)
        ]
    return [s.replace(os.sep, "_").lstrip("_") or "scan" for s in stems]


@dataclass(frozen=True)
class InputItem:
    """One thing to score before hashing: a NIfTI file, or a DICOM ``series`` (``path`` its folder or
    archive); readers of other layouts (BIDS) also give the stem, output names and the source facts."""

    path: Path
    series: DicomSeries | None = None
    stem: str | None = None
    contrast: str | None = None
    contrast_note: str | None = None
    names: tuple[tuple[str, str], ...] = ()
    source: tuple[tuple[str, Any], ...] = ()

    def content_hash(self) -> str:
        return self.series.content_hash if self.series is not None else file_sha256(self.path)


def collect_inputs(inputs: Sequence[str | os.PathLike[str]], patient_salt: bytes | None = None
                   ) -> tuple[list[InputItem], list[str], list[tuple[Path, str]]]:
    """NIfTI files (as :func:`find_inputs`) and the DICOM series in the same folders, zip archives and
    DICOM files; with notes on what was skipped and the entries that cannot be read (with their reason).
    Contrast of a series comes from the series itself."""
    direct_dicom = [Path(p).expanduser() for p in inputs if path_problem(Path(p).expanduser()) is None
                    and Path(p).expanduser().is_file()
                    and (is_zip_archive(p) or (not is_nifti_path(p) and looks_like_dicom(p)))]
    nifti_inputs = [p for p in inputs if Path(p).expanduser() not in direct_dicom]
    found = find_inputs(nifti_inputs) if nifti_inputs else Discovery()
    paths = found.paths
    folders = [Path(p).expanduser() for p in nifti_inputs if Path(p).expanduser().is_dir()]
    series, notes = find_series([*folders, *direct_dicom], patient_salt) if folders or direct_dicom else ([], [])
    notes = [*found.notes, *notes]
    stems = unique_stems(paths)
    items = [InputItem(path=p, stem=stem) for p, stem in zip(paths, stems, strict=True)]
    for one in series:
        contrast, why = one.contrast
        items.append(InputItem(path=Path(one.container), series=one, stem=one.label, contrast=contrast,
                               contrast_note=f"series: {why}"))
    return items, notes, list(found.problems)


def _distinct(stems: Sequence[str]) -> list[str]:
    seen: Counter[str] = Counter()
    out = []
    for stem in stems:
        seen[stem] += 1
        out.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return out


@dataclass
class BatchSummary:
    """What a batch did, for the summary line and the exit code."""

    run_id: int
    out_dir: Path
    db_url: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for r in self.rows if r["status"] == status)

    @property
    def failed(self) -> int:
        return self.count("failed")


def resolve_calibration(store: Store, ref: str | None, model_id: int, settings_hash: str | None = None,
                        settings: dict[str, Any] | None = None, *, force: bool = False
                        ) -> tuple[int | None, Calibration | None]:
    """The stored calibration ``ref`` (``name`` or ``name@version``) as it applies to maps of model
    ``model_id`` made with these settings: refused when it belongs to another model or, given
    ``settings_hash``, when it was made on maps scored otherwise (a warning instead with ``force``).
    The one check for ``score``, ``bids`` and ``evaluate``; returns its id and the :class:`Calibration`."""
    if ref is None:
        return None, None
    name, version = parse_calibration_ref(ref)
    with store.session() as s:
        row = get_calibration(s, name, version)
        if row is None:
            raise BatchError(f"calibration {ref!r} not found in {store.url}; create it with `anomaly calibrate` "
                             "or list them with `anomaly calibrate --list`")
        if row.model_id != model_id:
            model = s.get(Model, model_id)
            raise BatchError(f"calibration {row.ref} was made for model {row.model.name!r}, these maps are "
                             f"made with {model.name if model else model_id!r}; its thresholds do not apply to "
                             "them: calibrate this model first")
        calibration = Calibration.from_stored(row)
        row_id = row.id
    if settings_hash is not None:
        problem = calibration.settings_problem(settings_hash, settings)
        if problem and not force:
            raise BatchError(problem)
        if problem:
            print(f"warning: {problem}", file=sys.stderr)
    return row_id, calibration


def score_batch(inputs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str], model: SliceModel,
                store: Store, settings: ScoringSettings | None = None, *, calibration: str | None = None,
                executor: Executor | None = None, csv_path: str | os.PathLike[str] | None = None,
                progress: bool = True, atlas: Any = None,
                on_outcome: Callable[[ScanOutcome], None] | None = None,
                force_calibration: bool = False, patient_salt: bytes | None = None,
                items: Sequence[InputItem] | None = None, max_bytes: int | None = None,
                brain_mask: str | os.PathLike[str] | None = None, t1_for_mask: str = "auto") -> BatchSummary:
    """Score every input into ``out_dir`` and ``store``; returns the per-file rows written to the CSV.

    Inputs are NIfTI files, folders (NIfTI files and DICOM series found in them) and zip archives of
    DICOM files; ``items`` replaces that search (a BIDS reader gives its images with their names).
    Each scan's output stem is claimed in the store before scoring (see :mod:`anomaly.outputs`), so
    no map is ever overwritten by another scan or run. ``max_bytes`` is the memory budget of one volume
    (default: :func:`anomaly.volume.max_volume_bytes`). ``brain_mask``: the user's brain mask file, or
    a folder of masks named like the scans. ``t1_for_mask``: ``auto``, ``none`` or a T1 file, where the
    brain masks of T2/FLAIR heads come from (see :class:`pipelines.work.ScanTask`)."""
    started = time.perf_counter()
    settings = settings or ScoringSettings()
    executor = executor or LocalExecutor()
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    notes: list[str] = []
    problems: list[tuple[Path, str]] = []
    if items is None:
        items, notes, problems = collect_inputs(inputs, patient_salt)
    if not items and not problems:
        raise BatchError(f"no .nii, .nii.gz or DICOM image files found in {', '.join(map(str, inputs))}; "
                         "give NIfTI files, DICOM folders or zip archives of DICOM files, or folders that "
                         "contain them")
    identity = model.identity()
    with store.session() as s:
        model_row = get_or_create_model(s, identity.name, identity.weights_hash, identity.config)
        model_id = model_row.id
    calibration_id, applied = resolve_calibration(store, calibration, model_id, settings.hash(), settings.to_dict(),
                                                  force=force_calibration)
    with store.session() as s:
        run = open_run(s, model_id, settings.to_dict(), settings.hash(), out, calibration_id, executor.name)
        run_id = run.id

    hashed: list[InputItem] = []
    hashes: list[str] = []
    for item in _bar(items, progress, "hashing", leave=False):
        try:
            hashes.append(item.content_hash())
            hashed.append(item)
        except OSError as exc:  # vanished, unreadable or replaced by a special file since it was found
            problems.append((item.path, f"cannot read the file ({exc.strerror or exc}); check it exists and is readable"))
    items = hashed
    stems = _distinct([item.stem or scan_name(item.path) for item in items])
    tasks: list[ScanTask] = []
    rows: list[dict[str, Any]] = []
    first_of: dict[str, str] = {}
    skipped = 0
    with store.session() as s:
        # what is already recorded, read with set queries (not one query per file): a resumed batch of
        # 100,000 scans decides what to skip in a few hundred statements
        known = scans_by_hash(s, hashes)
        states = scored_states(s, run_id, [scan.id for scan in known.values()])
        for item, preferred, digest in zip(items, stems, hashes, strict=True):
            task = ScanTask(path=item.path, stem=preferred, content_hash=digest, out_dir=out, series=item.series,
                            contrast=item.contrast, contrast_note=item.contrast_note, names=item.names,
                            source=item.source, max_bytes=max_bytes,
                            brain_mask=Path(brain_mask) if brain_mask is not None else None,
                            t1_for_mask=str(t1_for_mask))
            where = item.series.where if item.series is not None else str(item.path)
            if digest in first_of:
                rows.append(_row(task, "skipped", run_id, applied,
                                 error=f"same content as {first_of[digest]}; scored once"))
                skipped += 1
                continue
            first_of[digest] = where
            scan = get_or_create_scan(s, digest, item.path, preferred, known=known.get(digest))
            set_scan_source(s, scan, task.source_facts)
            done = states.get(scan.id)
            stem = claim_output_name(s, run_id, scan.id, out, stem_candidates(preferred, digest, run_id),
                                     in_use=lambda stem: outputs_present(out, stem),
                                     held=None if done is None else done.stem)
            task = dataclasses.replace(task, stem=stem)
            if (done is not None and done.status == "ok" and done.map_path
                    and Path(done.map_path) == output_path(out, stem, "anomaly") and Path(done.map_path).is_file()):
                rows.append(_row(task, "skipped", run_id, applied, score=done.score, map_path=done.map_path,
                                 flagged=done.flagged, mask_path=done.mask_path, recon_path=done.recon_path,
                                 n_findings=done.n_findings))
                skipped += 1
                continue
            tasks.append(task)
            rows.append({})  # placeholder, filled in input order below
    for path, reason in problems:
        rows.append(_row(ScanTask(path=path, stem=scan_name(path), content_hash="", out_dir=out), "failed",
                         run_id, applied, error=f"{path}: {reason}"))

    slot_of = {t.content_hash: i for i, t in zip((i for i, r in enumerate(rows) if not r), tasks, strict=True)}
    for outcome in _bar(executor.map(tasks, model, settings, applied, atlas), progress, "scoring", total=len(tasks)):
        with store.session() as s:
            scan = get_or_create_scan(s, outcome.task.content_hash, outcome.task.path, outcome.task.stem,
                                      **outcome.facts)
            set_scan_source(s, scan, outcome.task.source_facts)
            upsert_result(s, run_id, scan, status=outcome.status, input_path=str(outcome.task.path),
                          error=outcome.error, score=outcome.score, flagged=outcome.flagged,
                          map_path=outcome.map_path, recon_path=outcome.recon_path, mask_path=outcome.mask_path,
                          timing_s=outcome.timing_s, details=outcome.details.to_dict(), findings=outcome.findings)
        rows[slot_of[outcome.task.content_hash]] = _row(outcome.task, outcome.status, run_id, applied, score=outcome.score,
                                 map_path=outcome.map_path, error=outcome.error, flagged=outcome.flagged,
                                 mask_path=outcome.mask_path, recon_path=outcome.recon_path,
                                 n_findings=len(outcome.findings), timing_s=outcome.timing_s,
                                 warnings="; ".join(outcome.details.warnings))
        if on_outcome is not None:
            on_outcome(outcome)
    with store.session() as s:
        finish_run(s, run_id, n_skipped=skipped)
    summary = BatchSummary(run_id=run_id, out_dir=out, db_url=store.url, rows=rows,
                           seconds=time.perf_counter() - started, notes=notes)
    if csv_path is not None:
        write_csv(csv_path, rows)
    return summary


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Delete temporary map files an interrupted batch left behind (finished maps are never touched)."""
    stale = [p for kind in KINDS for p in out_dir.glob(f".*_{kind}.nii*.*") if p.is_file()]
    stale += [p for p in out_dir.glob("sub-*/**/.sub-*.nii*.*") if p.is_file()]  # BIDS derivative names
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _row(task: ScanTask, status: str, run_id: int, calibration: Calibration | None, **values: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(CSV_COLUMNS, "")
    row.update(path=str(task.path), scan_id=task.content_hash, status=status, run_id=run_id,
               calibration=calibration.ref if calibration else "",
               series_uid=(task.series.series_uid or "") if task.series is not None else "")
    row.update({k: ("" if v is None else v) for k, v in values.items()})
    return row


def write_csv(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]],
              columns: Sequence[str] | None = None) -> Path:
    """Write rows as CSV atomically (temporary file, then rename); with ``columns`` given, rows are
    written as they come (an iterator is never held in memory)."""
    if columns is None:
        listed = list(rows)
        columns, rows = (list(listed[0]) if listed else CSV_COLUMNS), listed
    path = Path(path).expanduser()
    cols = list(columns)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _bar(items: Iterable[Any], enabled: bool, desc: str, total: int | None = None, leave: bool = True) -> Iterable[Any]:
    if not enabled:
        return items
    return tqdm(items, desc=desc, total=total, unit="scan", leave=leave, file=sys.stderr,
                disable=None, dynamic_ncols=True)

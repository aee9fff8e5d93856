"""The BIDS App (``anomaly bids BIDS_DIR OUTPUT_DIR participant|group``).

``participant`` scores every anatomical image of the chosen subjects and sessions through the same
batch as ``anomaly score`` (resumable, one bad image never stops the rest, results in the database),
and makes OUTPUT_DIR a BIDS derivatives dataset: ``dataset_description.json``, per image the anomaly
map, the brain mask and (with a calibration) the findings mask under names that keep the source
entities and add ``desc-``, each with a JSON sidecar, and one self-contained HTML report per subject.
``group`` reads those sidecars back and gathers scan scores and findings into two tables.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomaly import __version__
from anomaly.config import ScoringSettings
from anomaly.fileio import atomic_path, write_text_atomic
from anomaly.io.bids import (
    BidsError,
    BidsImage,
    check_existing_description,
    derivative_description,
    derivative_names,
    find_anatomical,
    sidecar_path,
)
from anomaly.jsonio import write_json
from anomaly.models.base import SliceModel
from anomaly.report import ReportImage, render_subject_report
from anomaly.store import Store
from pipelines.batch import BatchError, BatchSummary, InputItem, score_batch
from pipelines.executors import Executor
from pipelines.work import ScanOutcome

BIDSIGNORE = ("*.html", "group_scans.tsv", "group_findings.tsv", "logs/")
SCAN_COLUMNS = ("subject", "session", "source", "suffix", "contrast", "score", "flagged", "n_findings",
                "calibration", "map")
FINDING_COLUMNS = ("subject", "session", "source", "rank", "n_voxels", "volume_ml", "centroid_x", "centroid_y",
                   "centroid_z", "peak_x", "peak_y", "peak_z", "peak", "mean", "region_centroid",
                   "region_majority", "atlas")


@dataclass
class ParticipantSummary:
    """What ``participant`` did: the batch summary, the images, reports and output problems."""

    batch: BatchSummary
    images: list[BidsImage]
    reports: list[Path] = field(default_factory=list)


def _json(path: Path, payload: dict[str, Any]) -> None:
    write_json(path, payload)


def _items(images: Sequence[BidsImage]) -> list[InputItem]:
    items = []
    for image in images:
        contrast, note = image.contrast
        stem = Path(image.relpath).name.split(".nii")[0]
        items.append(InputItem(path=image.path, stem=stem, contrast=contrast, contrast_note=note,
                               names=tuple(derivative_names(image.relpath).items()),
                               source=tuple(image.source_facts().items())))
    return items


class _Sidecars:
    """Writes the JSON sidecars of each image's outputs as its outcome arrives."""

    def __init__(self, out: Path, by_path: dict[Path, BidsImage], model: SliceModel, settings: ScoringSettings) -> None:
        self.out, self.by_path, self.settings = out, by_path, settings
        identity = model.identity()
        self.model = {"Name": identity.name, "WeightsHash": identity.weights_hash}

    def __call__(self, outcome: ScanOutcome) -> None:
        image = self.by_path.get(Path(outcome.task.path))
        if image is None or outcome.status != "ok" or not outcome.map_path:
            return
        raw = f"bids:raw:{image.relpath}"
        names = derivative_names(image.relpath)
        details = outcome.details
        cal = details.calibration
        calibration = None if cal is None else {"Name": cal.name, "VoxelThreshold": cal.voxel_threshold,
                                                "ScanThreshold": cal.scan_threshold}
        common = {"Model": self.model, "SettingsHash": self.settings.hash()}
        _json(sidecar_path(outcome.map_path), {
            "Description": "Voxel anomaly map on the source image's grid: how far each voxel is from what the "
                           "model reconstructs as normal (higher is more unusual; zero outside the brain).",
            "Sources": [raw], **common, "Settings": self.settings.to_dict(), "Calibration": calibration,
            "Contrast": details.contrast, "ContrastSource": details.contrast_source,
            "ScanScore": outcome.score, "Flagged": outcome.flagged, "Findings": outcome.findings,
            "Warnings": details.warnings,
        })
        _json(sidecar_path(self.out / names["brain"]), {
            "Type": "Brain", "Description": "Brain mask the anomaly map was scored inside.",
            "Sources": [raw], **common})
        if outcome.mask_path:
            _json(sidecar_path(outcome.mask_path), {
                "Type": "Lesion", "Description": "Calibrated findings mask: brain voxels whose anomaly value is at "
                "or above the calibration's voxel threshold.",
                "Sources": [raw, f"bids::{names['anomaly']}"], **common, "Calibration": calibration})
        if outcome.recon_path:
            _json(sidecar_path(outcome.recon_path), {
                "Description": "The model's (restored) reconstruction of the image, on the source grid.",
                "Sources": [raw], **common})


def write_description(out: Path, bids_dir: Path, model: SliceModel, settings: ScoringSettings) -> None:
    """``dataset_description.json`` and ``.bidsignore`` of the derivatives (refusing another model's folder)."""
    identity = model.identity()
    description = derivative_description(bids_dir, version=__version__, model_name=identity.name,
                                         model_hash=identity.weights_hash, settings_hash=settings.hash())
    check_existing_description(out, description)
    out.mkdir(parents=True, exist_ok=True)
    _json(out / "dataset_description.json", description)
    write_text_atomic(out / ".bidsignore", "\n".join(BIDSIGNORE) + "\n")


def run_participant(bids_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], model: SliceModel,
                    store: Store, settings: ScoringSettings | None = None, *,
                    participants: Sequence[str] | None = None, sessions: Sequence[str] | None = None,
                    calibration: str | None = None, force_calibration: bool = False,
                    executor: Executor | None = None, progress: bool = True, atlas: Any = None,
                    validate: bool = True, reports: bool = True) -> ParticipantSummary:
    """Score the chosen subjects' anatomical images into the derivatives dataset ``out_dir``."""
    settings = settings or ScoringSettings()
    source = Path(bids_dir).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve()
    if out == source:
        raise BatchError(f"OUTPUT_DIR {out} is the BIDS dataset itself; write derivatives into another folder "
                         f"(e.g. {source}/derivatives/anomaly)")
    try:
        images = find_anatomical(source, participants, sessions, validate=validate)
    except BidsError as exc:
        raise BatchError(str(exc)) from exc
    if not images:
        raise BatchError(f"{source}: no anatomical images ({', '.join(['T1w', 'T2w', 'FLAIR', 'PDw', 'T2starw'])}) "
                         "for the chosen participants and sessions")
    try:
        write_description(out, source, model, settings)
    except BidsError as exc:
        raise BatchError(str(exc)) from exc
    by_path = {Path(im.path): im for im in images}
    batch = score_batch([source], out, model, store, settings, calibration=calibration,
                        force_calibration=force_calibration, executor=executor, progress=progress, atlas=atlas,
                        items=_items(images), on_outcome=_Sidecars(out, by_path, model, settings))
    summary = ParticipantSummary(batch=batch, images=images)
    if reports:
        summary.reports = write_reports(out, images, batch, model)
    return summary


def _report_images(out: Path, images: Sequence[BidsImage], batch: BatchSummary) -> list[ReportImage]:
    rows = {Path(r["path"]): r for r in batch.rows}
    entries = []
    for image in images:
        names = derivative_names(image.relpath)
        row = rows.get(Path(image.path), {})
        if row.get("status") == "failed":
            entries.append(ReportImage(name=image.relpath, status="failed", error=row.get("error")))
            continue
        meta_path = sidecar_path(out / names["anomaly"])
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            entries.append(ReportImage(name=image.relpath, status="failed",
                                       error=row.get("error") or f"{meta_path}: no sidecar; score again"))
            continue
        cal = meta.get("Calibration") or None
        mask = out / names["mask"]
        entries.append(ReportImage(
            name=image.relpath, score=meta.get("ScanScore"), flagged=meta.get("Flagged"),
            contrast=meta.get("Contrast"), findings=list(meta.get("Findings") or []),
            warnings=list(meta.get("Warnings") or []),
            calibration=None if not cal else {"name": cal.get("Name"), "voxel_threshold": cal.get("VoxelThreshold"),
                                              "scan_threshold": cal.get("ScanThreshold")},
            input_path=Path(image.path), map_path=out / names["anomaly"], brain_path=out / names["brain"],
            mask_path=mask if cal and mask.is_file() else None))
    return entries


def write_reports(out: Path, images: Sequence[BidsImage], batch: BatchSummary, model: SliceModel) -> list[Path]:
    """One ``sub-<label>.html`` per subject in ``out``."""
    written = []
    identity = model.identity()
    for subject in sorted({im.subject for im in images}):
        mine = [im for im in images if im.subject == subject]
        about = {"model": f"{identity.name} ({identity.weights_hash[:16]})", "software": f"brain-anomaly {__version__}",
                 "images": len(mine)}
        document = render_subject_report(subject, _report_images(out, mine, batch), about=about)
        written.append(write_text_atomic(out / f"sub-{subject}.html", document))
    return written


# ----------------------------------------------------------------------------------------------- group


def _entity(relpath: str, key: str) -> str:
    for part in Path(relpath).name.split("_"):
        if part.startswith(f"{key}-"):
            return part[len(key) + 1:]
    return ""


def run_group(out_dir: str | os.PathLike[str]) -> tuple[Path, Path, int]:
    """Gather every map sidecar of the derivatives into ``group_scans.tsv`` and ``group_findings.tsv``."""
    out = Path(out_dir).expanduser().resolve()
    sidecars = sorted(out.glob("sub-*/**/*_desc-anomaly_*.json"))
    if not sidecars:
        raise BatchError(f"{out}: no anomaly map sidecars (sub-*/**/*_desc-anomaly_*.json); run the participant "
                         "level into this folder first")
    scans: list[dict[str, Any]] = []
    findings: list[dict[str, Any]] = []
    for path in sidecars:
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BatchError(f"{path}: unreadable sidecar ({exc}); run the participant level again") from exc
        source = str((meta.get("Sources") or [""])[0]).removeprefix("bids:raw:")
        rel = path.relative_to(out).as_posix()
        base = {"subject": _entity(rel, "sub"), "session": _entity(rel, "ses"), "source": source}
        cal = meta.get("Calibration") or {}
        scans.append({**base, "suffix": rel.rsplit("_", 1)[-1].removesuffix(".json"),
                      "contrast": meta.get("Contrast"), "score": meta.get("ScanScore"), "flagged": meta.get("Flagged"),
                      "n_findings": len(meta.get("Findings") or []), "calibration": cal.get("Name"),
                      "map": rel.removesuffix(".json") + ".nii.gz"})
        findings.extend({**base, **{k: f.get(k) for k in FINDING_COLUMNS if k in f}} for f in meta.get("Findings") or [])
    scans_path, findings_path = out / "group_scans.tsv", out / "group_findings.tsv"
    _tsv(scans_path, scans, SCAN_COLUMNS)
    _tsv(findings_path, findings, FINDING_COLUMNS)
    return scans_path, findings_path, len(scans)


def _tsv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), delimiter="\t", extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("n/a" if row.get(k) is None else row.get(k)) for k in columns})

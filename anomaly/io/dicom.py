"""DICOM series as volumes.

``find_series`` groups the DICOM files of folders and zip archives into series (read with pydicom)
and records what identifies each one: study and series UIDs, description, acquisition date and
parameters, and a salted hash of the patient (never the name or ID itself). ``load_series`` refuses
what cannot be scored as one 3D volume with a reason per series (localisers, derived images,
multi-frame oddities, missing or unevenly spaced slices, gantry tilt) and converts the rest with
dicom2nifti, on the series' own grid: columns, rows, then slices in InstanceNumber order.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import re
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from anomaly.contrast import contrast_from_metadata
from anomaly.volume import Volume, VolumeError, is_nifti_path

DICOM_SUFFIXES = (".dcm", ".ima", ".dicom")
MAX_TILT_DEG = 0.5
"""Largest angle between the slice normal and the line through the slice positions (gantry tilt)."""
SPACING_ATOL_MM = 0.05
SPACING_RTOL = 0.02
"""Slice gaps may differ from the median gap by at most this much (mm, fraction)."""

_HINT_EXPORT = "export the complete series again from the PACS or scanner"
_LOCALISER_WORDS = re.compile(r"locali[sz]er|scout|survey|3[ _-]?plane|aahead|aascout")


class DicomSeriesError(VolumeError):
    """A DICOM series that cannot be scored as one 3D volume: which series, why, and what to do."""


@dataclass(frozen=True)
class DicomSeries:
    """One series found on disk: where its files are, its identity and acquisition facts (no patient data)."""

    container: str
    files: tuple[str, ...]
    in_archive: bool
    content_hash: str
    study_uid: str | None = None
    series_uid: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    protocol_name: str | None = None
    sequence_name: str | None = None
    scanning_sequence: str | None = None
    modality: str | None = None
    acquisition_date: str | None = None
    repetition_time_ms: float | None = None
    echo_time_ms: float | None = None
    inversion_time_ms: float | None = None
    image_type: tuple[str, ...] = ()
    manufacturer: str | None = None
    patient_hash: str | None = None

    @property
    def label(self) -> str:
        """A file-name-safe name: container, series number and description (``study1_s003_T1_MPRAGE``)."""
        base = Path(self.container).name
        if base.lower().endswith(".zip"):
            base = base[:-4]
        number = f"s{self.series_number:03d}" if self.series_number is not None else (
            f"u{(self.series_uid or self.content_hash)[-8:]}")
        parts = [base, number]
        if self.series_description:
            parts.append(self.series_description)
        text = "_".join(parts)
        return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_.") or "series"

    @property
    def where(self) -> str:
        """How messages name the series: its container, number and description."""
        what = f"series {self.series_number}" if self.series_number is not None else f"series {self.series_uid}"
        if self.series_description:
            what += f" ({self.series_description})"
        return f"{self.container}: {what}"

    @property
    def contrast(self) -> tuple[str | None, str]:
        """The contrast read from the series (description, protocol and sequence names, else TR/TE/TI)."""
        return contrast_from_metadata((self.series_description, self.protocol_name, self.sequence_name),
                                      self.repetition_time_ms, self.echo_time_ms, self.inversion_time_ms)

    def store_facts(self) -> dict[str, Any]:
        """What the result store keeps about the series' source (identifiers, date, acquisition facts)."""
        contrast, reason = self.contrast
        return {
            "source": "dicom",
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "series_description": self.series_description,
            "acquisition_date": self.acquisition_date,
            "patient_hash": self.patient_hash,
            "source_meta": {
                "series_number": self.series_number, "modality": self.modality,
                "protocol_name": self.protocol_name, "sequence_name": self.sequence_name,
                "scanning_sequence": self.scanning_sequence, "image_type": list(self.image_type),
                "repetition_time_ms": self.repetition_time_ms, "echo_time_ms": self.echo_time_ms,
                "inversion_time_ms": self.inversion_time_ms, "manufacturer": self.manufacturer,
                "n_files": len(self.files), "contrast": contrast, "contrast_reason": reason,
            },
        }


# -------------------------------------------------------------------------------------------- finding


def patient_hash(dataset: Any, salt: bytes | None) -> str | None:
    """HMAC-SHA256 of the PatientID (else the PatientName) under ``salt``; None without a salt or either.

    Scans of one patient share the hash within one salt, while the database never holds the name or
    ID; without the salt the hash cannot be checked against a list of IDs."""
    if not salt:
        return None
    key = str(dataset.get("PatientID", "") or "").strip() or str(dataset.get("PatientName", "") or "").strip()
    if not key:
        return None
    return hmac.new(salt, key.encode("utf-8"), hashlib.sha256).hexdigest()


def is_zip_archive(path: str | os.PathLike[str]) -> bool:
    """A ``.zip`` file (the form PACS and web viewers export studies in)."""
    path = Path(path)
    return path.is_file() and path.name.lower().endswith(".zip") and zipfile.is_zipfile(path)


def looks_like_dicom(path: str | os.PathLike[str]) -> bool:
    """A file with the DICOM preamble magic ``DICM`` at byte 128, or a DICOM file name suffix."""
    path = Path(path)
    if path.name.lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


@dataclass(frozen=True)
class _Entry:
    name: str
    digest: str
    header: Any


def _parse(blob: bytes) -> Any:
    """A pydicom dataset of an image object; None when the bytes are not DICOM, False for a DICOM object
    without pixels (a report, a presentation state, a DICOMDIR)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    has_magic = len(blob) >= 132 and blob[128:132] == b"DICM"
    try:
        ds = pydicom.dcmread(io.BytesIO(blob), force=not has_magic)
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, AttributeError, OSError):
        return None
    if "SOPClassUID" not in ds and "SeriesInstanceUID" not in ds:
        return None
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return False
    return ds


def _walk(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def find_series(inputs: Sequence[str | os.PathLike[str]], salt: bytes | None = None
                ) -> tuple[list[DicomSeries], list[str]]:
    """The DICOM series in folders (searched recursively, NIfTI files left aside), zip archives and
    DICOM files given directly, in a stable order; with notes on what was skipped and why."""
    groups: dict[tuple[str, bool, str], list[_Entry]] = {}
    notes: list[str] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            sources = [(p, False) for p in _walk(path) if not is_nifti_path(p)]
            archives = [p for p, _ in sources if is_zip_archive(p)]
            files = [p for p, _ in sources if p not in archives and looks_like_dicom(p)]
            ignored = len(sources) - len(archives) - len(files)
            if ignored and files:
                notes.append(f"{path}: {ignored} file(s) that are neither DICOM nor NIfTI ignored")
            _collect_files(path, files, groups, notes)
            for archive in archives:
                _collect_archive(archive, groups, notes)
        elif is_zip_archive(path):
            _collect_archive(path, groups, notes)
        elif path.is_file() and looks_like_dicom(path):
            _collect_files(path.parent, [path], groups, notes)
    series = [_make_series(container, in_archive, entries, salt)
              for (container, in_archive, _), entries in groups.items()]
    series.sort(key=lambda s: (s.container, s.series_number if s.series_number is not None else 1 << 30,
                               s.series_uid or ""))
    return series, notes


def _collect_files(root: Path, files: Sequence[Path], groups: dict[tuple[str, bool, str], list[_Entry]],
                   notes: list[str]) -> None:
    skipped = 0
    for file in files:
        try:
            blob = file.read_bytes()
        except OSError as exc:
            notes.append(f"{file}: cannot be read ({exc}); skipped")
            continue
        ds = _parse(blob)
        if not ds:
            skipped += 1
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        groups.setdefault((str(root.resolve()), False, uid), []).append(
            _Entry(str(file.resolve()), hashlib.sha256(blob).hexdigest(), ds))
    if skipped:
        notes.append(f"{root}: {skipped} DICOM file(s) without an image (reports, presentation states, "
                     "DICOMDIR) or unreadable skipped")


def _collect_archive(archive: Path, groups: dict[tuple[str, bool, str], list[_Entry]], notes: list[str]) -> None:
    skipped = nifti = 0
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                base = info.filename.rsplit("/", 1)[-1]
                nifti += bool(base) and is_nifti_path(base)
                if info.is_dir() or not base or base.startswith(".") or is_nifti_path(base):
                    continue
                ds = _parse(blob := zf.read(info))
                if not ds:
                    skipped += 1
                    continue
                uid = str(ds.get("SeriesInstanceUID", "") or "")
                groups.setdefault((str(archive.resolve()), True, uid), []).append(
                    _Entry(info.filename, hashlib.sha256(blob).hexdigest(), ds))
    except (zipfile.BadZipFile, OSError) as exc:
        notes.append(f"{archive}: not a readable zip archive ({exc}); skipped")
        return
    if skipped:
        notes.append(f"{archive}: {skipped} member(s) that are not DICOM images skipped")
    if nifti:
        notes.append(f"{archive}: {nifti} NIfTI file(s) inside the archive are not read; unpack it and give the "
                     "folder")


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _text(value: Any) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


def _iso_date(value: Any) -> str | None:
    text = _text(value)
    if text and re.fullmatch(r"\d{8}", text):
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return text


def _instance(ds: Any) -> int:
    number = _number(ds.get("InstanceNumber"))
    return int(number) if number is not None else 0


def _make_series(container: str, in_archive: bool, entries: list[_Entry], salt: bytes | None) -> DicomSeries:
    entries = sorted(entries, key=lambda e: (_instance(e.header), e.name))
    first = entries[0].header
    digest = hashlib.sha256("".join(sorted(e.digest for e in entries)).encode()).hexdigest()
    number = _number(first.get("SeriesNumber"))
    date = first.get("AcquisitionDate") or first.get("SeriesDate") or first.get("StudyDate")
    names = [e.name for e in entries]
    if not in_archive:
        container = os.path.commonpath([os.path.dirname(n) for n in names])
    return DicomSeries(
        container=container, files=tuple(names), in_archive=in_archive, content_hash=digest,
        study_uid=_text(first.get("StudyInstanceUID")), series_uid=_text(first.get("SeriesInstanceUID")),
        series_number=int(number) if number is not None else None,
        series_description=_text(first.get("SeriesDescription")), protocol_name=_text(first.get("ProtocolName")),
        sequence_name=_text(first.get("SequenceName")), scanning_sequence=_text(first.get("ScanningSequence")),
        modality=_text(first.get("Modality")), acquisition_date=_iso_date(date),
        repetition_time_ms=_number(first.get("RepetitionTime")), echo_time_ms=_number(first.get("EchoTime")),
        inversion_time_ms=_number(first.get("InversionTime")),
        image_type=tuple(str(v).upper() for v in (first.get("ImageType") or ())),
        manufacturer=_text(first.get("Manufacturer")), patient_hash=patient_hash(first, salt),
    )


# -------------------------------------------------------------------------------------------- loading


def read_datasets(series: DicomSeries) -> list[Any]:
    """The series' datasets with pixel data, in InstanceNumber order."""
    import pydicom

    blobs: list[bytes] = []
    if series.in_archive:
        with zipfile.ZipFile(series.container) as zf:
            blobs = [zf.read(name) for name in series.files]
    else:
        blobs = [Path(name).read_bytes() for name in series.files]
    datasets = []
    for blob in blobs:
        has_magic = len(blob) >= 132 and blob[128:132] == b"DICM"
        datasets.append(pydicom.dcmread(io.BytesIO(blob), force=not has_magic))
    return sorted(datasets, key=_instance)


def check_series(series: DicomSeries, datasets: Sequence[Any]) -> None:
    """Raise :class:`DicomSeriesError` for a series that is not one scorable 3D volume."""
    where = series.where
    image_type = [str(v).upper() for v in (datasets[0].get("ImageType") or ())]
    text = " ".join(filter(None, (series.series_description, series.protocol_name))).lower()
    if any(t in ("LOCALIZER", "SCOUT") for t in image_type) or _LOCALISER_WORDS.search(text):
        raise DicomSeriesError(where, "a localiser (scout) series: planning images, not a volume to score",
                               "nothing to do: the study's other series are scored")
    if image_type and image_type[0] == "DERIVED":
        raise DicomSeriesError(where, f"derived images (ImageType {chr(92).join(image_type)}): a reformat, "
                               "projection, subtraction or computed map, not an acquired volume",
                               "score the original acquisition (ImageType ORIGINAL) of the same contrast")
    frames = [int(_number(ds.get("NumberOfFrames")) or 1) for ds in datasets]
    if any(f > 1 for f in frames):
        if len(datasets) > 1:
            raise DicomSeriesError(where, f"{len(datasets)} files in one series, {sum(f > 1 for f in frames)} of "
                                   f"them multi-frame (frames per file: {sorted(set(frames))})",
                                   "a multi-frame series is read as one file holding one 3D stack: export it as "
                                   "one enhanced file or as classic single-frame images")
        return
    if len(datasets) < 3:
        raise DicomSeriesError(where, f"only {len(datasets)} image(s): not a 3D volume",
                               "score a 3D acquisition; " + _HINT_EXPORT + " if images are missing")
    sizes = {(int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) for ds in datasets}
    if len(sizes) > 1:
        raise DicomSeriesError(where, f"images of different sizes in one series ({sorted(sizes)})",
                               "split the series into stacks of equal image size (dcm2niix does this)")
    missing = [tag for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
               if any(tag not in ds for ds in datasets)]
    if missing:
        raise DicomSeriesError(where, f"no geometry: {', '.join(missing)} missing from some images",
                               _HINT_EXPORT + " with its full headers (anonymisers sometimes strip them)")
    orient = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in datasets])
    if not np.allclose(orient, orient[0], atol=1e-4):
        raise DicomSeriesError(where, "images with different orientations in one series (several stacks or "
                               "planes)", "split the series by orientation (dcm2niix does this) and score each stack")
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    normal = np.cross(orient[0, :3], orient[0, 3:])
    normal /= np.linalg.norm(normal)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    gaps = np.diff(along[order])
    if np.any(gaps < 0.01):
        echoes = sorted({str(ds.get("EchoNumbers", "")) for ds in datasets} - {""})
        detail = f"; echo numbers {', '.join(echoes)}" if len(echoes) > 1 else ""
        raise DicomSeriesError(where, f"{int(np.sum(gaps < 0.01))} image(s) share a slice position with another "
                               f"(multi-echo, repeated or several volumes in one series{detail})",
                               "split the series by echo or time point (dcm2niix does this) and score each volume")
    span = positions[order[-1]] - positions[order[0]]
    tilt = float(np.degrees(np.arccos(min(1.0, abs(float(span @ normal)) / float(np.linalg.norm(span))))))
    if tilt > MAX_TILT_DEG:
        raise DicomSeriesError(where, f"slices are sheared by {tilt:.1f} degrees against their normal "
                               "(gantry tilt or a staggered stack)",
                               "resample the series onto an orthogonal grid (dcm2niix corrects gantry tilt) "
                               "and score the NIfTI")
    step = float(np.median(gaps))
    bad = np.flatnonzero(np.abs(gaps - step) > max(SPACING_ATOL_MM, SPACING_RTOL * step))
    if bad.size:
        i = int(bad[0])
        ratio = gaps[i] / step
        if ratio > 1.5 and abs(ratio - round(ratio)) < 0.1:
            reason = (f"{int(round(ratio)) - 1} slice(s) missing: the gap between slice positions "
                      f"{along[order][i]:.2f} and {along[order][i + 1]:.2f} mm is {gaps[i]:.2f} mm, the others "
                      f"{step:.2f} mm ({len(datasets)} images)")
        else:
            reason = (f"slice spacing is not constant: gaps from {gaps.min():.2f} to {gaps.max():.2f} mm "
                      f"({len(datasets)} images)")
        raise DicomSeriesError(where, reason, _HINT_EXPORT + "; unevenly spaced slices cannot share one grid")


def load_series(series: DicomSeries) -> Volume:
    """Check and convert one series to a :class:`Volume` on the series' own grid (see module docstring)."""
    from dicom2nifti import convert_dicom
    from dicom2nifti.exceptions import ConversionError, ConversionValidationError

    try:
        datasets = read_datasets(series)
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise DicomSeriesError(series.where, f"cannot read the files ({type(exc).__name__}: {exc})",
                               _HINT_EXPORT) from exc
    check_series(series, datasets)
    logging.getLogger("dicom2nifti").setLevel(logging.ERROR)
    try:
        result = convert_dicom.dicom_array_to_nifti(datasets, None, reorient_nifti=False)
    except (ConversionError, ConversionValidationError) as exc:
        raise DicomSeriesError(series.where, f"dicom2nifti cannot convert the series ({exc})",
                               "convert it with dcm2niix and score the NIfTI") from exc
    except Exception as exc:  # noqa: BLE001 - pixel decoding and vendor quirks surface here
        raise DicomSeriesError(series.where, f"the images cannot be decoded or converted "
                               f"({type(exc).__name__}: {exc})",
                               "a compressed transfer syntax may need a decoder (python-gdcm or pylibjpeg); "
                               "or convert with dcm2niix and score the NIfTI") from exc
    image = result["NII"]
    data = np.asarray(image.dataobj)
    if data.dtype.fields is not None or data.ndim == 4 and data.shape[3] in (3, 4) and "RGB" in str(
            datasets[0].get("PhotometricInterpretation", "")):
        raise DicomSeriesError(series.where, "colour (RGB) images, not a grey-value MRI volume",
                               "score the grey-value acquisition")
    if data.ndim > 3 and int(np.prod(data.shape[3:])) > 1:
        raise DicomSeriesError(series.where, f"{int(np.prod(data.shape[3:]))} volumes in one series "
                               f"(shape {data.shape})", "split the series into 3D volumes (dcm2niix does "
                               "this) and score each one")
    data = np.asarray(data.reshape(data.shape[:3]), dtype=np.float32)
    affine = np.asarray(image.affine, dtype=np.float64)
    data, affine = _instance_order(datasets, data, affine)
    if not np.isfinite(data).all() or float(data.min()) == float(data.max()):
        raise DicomSeriesError(series.where, "the images hold no usable signal (constant or invalid values)",
                               _HINT_EXPORT)
    return Volume(data=np.asfortranarray(data), affine=affine, path=Path(series.container) / series.label,
                  source_dtype=str(np.asarray(image.dataobj).dtype))


def _instance_order(datasets: Sequence[Any], data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Put slices in InstanceNumber order: dicom2nifti sorts them by position, ascending along the patient
    axis they advance on; when the instance numbers run the other way the slice axis is reversed."""
    if len(datasets) < 2 or data.shape[2] != len(datasets):
        return data, affine
    first, last = datasets[0], datasets[-1]
    if _instance(first) == _instance(last):
        return data, affine
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    p_first = lps_to_ras * np.array([float(v) for v in first.ImagePositionPatient])
    origin = affine[:3, 3]
    if np.linalg.norm(p_first - origin) < 1e-3:
        return data, affine
    flipped = np.ascontiguousarray(data[:, :, ::-1])
    new = affine.copy()
    new[:3, 3] = affine[:3, :3] @ np.array([0.0, 0.0, data.shape[2] - 1.0]) + affine[:3, 3]
    new[:3, 2] = -affine[:3, 2]
    return flipped, new

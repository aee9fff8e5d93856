"""Real DICOM series written with pydicom from a NIfTI-like volume (array + affine), one file per slice.

Columns run along array axis 0, rows along axis 1 and instance numbers along axis 2, so a reader that
keeps the series' own grid gets back exactly the source array and affine.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, RLELossless, generate_uid

_LPS = np.array([-1.0, -1.0, 1.0])


def _ds(value: float) -> str:
    text = f"{value:.10g}"
    return text if len(text) <= 16 else f"{value:.6f}"[:16]


def write_series(folder: Path, data: np.ndarray, affine: np.ndarray, *, description: str = "T1 MPRAGE",
                 series_number: int = 3, study_uid: str | None = None, series_uid: str | None = None,
                 skip: Sequence[int] = (), image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "M", "ND"),
                 tr: float | None = 2300.0, te: float | None = 2.98, ti: float | None = 900.0,
                 sequence_name: str | None = None, patient_id: str = "PAT-0042", patient_name: str = "Doe^Jane",
                 compress: bool = False, acquisition_date: str = "20240131", slope: float = 0.1,
                 tilt_mm: float = 0.0, prefix: str = "IM") -> list[Path]:
    """Write ``data`` (x, y, z) as an MR series in ``folder``; returns the files. ``skip`` leaves slices
    out (a missing slice); ``tilt_mm`` shifts each slice along the rows by that much per slice (a gantry tilt)."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    col0, col1 = affine[:3, 0], affine[:3, 1]
    dx, dy, dz = (float(np.linalg.norm(affine[:3, i])) for i in range(3))
    row_dir, col_dir = _LPS * col0 / dx, _LPS * col1 / dy
    stored = np.round(np.asarray(data, dtype=np.float64) / slope).astype(np.int16)
    files = []
    for k in range(data.shape[2]):
        if k in skip:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{prefix}{k + 1:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality = "MR"
        ds.PatientID, ds.PatientName = patient_id, patient_name
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = acquisition_date
        ds.SeriesNumber, ds.InstanceNumber = series_number, k + 1
        ds.SeriesDescription = description
        ds.ImageType = list(image_type)
        if sequence_name:
            ds.SequenceName = sequence_name
        for tag, value in (("RepetitionTime", tr), ("EchoTime", te), ("InversionTime", ti)):
            if value is not None:
                setattr(ds, tag, _ds(value))
        position = _LPS * (affine @ np.array([0.0, 0.0, float(k), 1.0]))[:3] + tilt_mm * k * col_dir
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [_ds(dy), _ds(dx)]
        ds.SliceThickness = _ds(dz)
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), "0"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        if compress:
            ds.compress(RLELossless, encoding_plugin="pydicom")
        ds.save_as(str(path), enforce_file_format=True)
        files.append(path)
    return files

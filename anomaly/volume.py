"""Volumes: NIfTI loading with validation that names the file and the reason, and atomic saving.

Every way a scan file can be unusable (missing, empty, not NIfTI, damaged gzip, truncated data, 2D,
a 4D series, NaN/Inf, constant, absurd geometry) becomes a :class:`VolumeError` that says what is
wrong and what to do, before any model sees the data.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, cast

import nibabel as nib
import numpy as np
from nibabel.volumeutils import array_from_file

from anomaly import gzipio
from anomaly.fileio import (
    IS_FOLDER,
    NotRegularFileError,
    atomic_path,
    open_regular,
    path_problem,
    says_what_to_do,
)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_STREAM_ERRORS: tuple[type[BaseException], ...] = (EOFError, *gzipio.CORRUPT_ERRORS)

MIN_SPACING_MM = 0.1
MAX_SPACING_MM = 10.0
MIN_AXIS = 8
MAX_AXIS = 2048
AFFINE_ATOL = 1e-3

_GZIP_MAGIC = b"\x1f\x8b"

MAX_VOLUME_MB_ENV = "ANOMALY_MAX_VOLUME_MB"
"""Environment variable holding the memory budget of one volume in MB (default ``DEFAULT_MAX_VOLUME_MB``)."""
DEFAULT_MAX_VOLUME_MB = 1024
"""Default budget: the voxels of one volume as float32 (268 M voxels, e.g. 640^3) and as stored."""
DEFLATE_MAX_RATIO = 1032
"""The most a deflate stream can expand (1032:1): a .nii.gz cannot hold more than this times its size."""
TRAILING_LIMIT = 16 << 20
"""Bytes a gzip stream may hold after the voxel data before the file is refused (read in bounded time)."""


_HINT_COPY_AGAIN = "the copy or download did not finish or the file is damaged: copy it again from the source"
_HINT_NIFTI = "supply a NIfTI-1 or NIfTI-2 file (.nii or .nii.gz)"


class VolumeError(ValueError):
    """A volume that cannot be used, with the file, the reason and what the user can do."""

    def __init__(self, path: str | os.PathLike[str] | None, reason: str, hint: str = "") -> None:
        self.path = str(path) if path is not None else "<array>"
        self.reason = reason
        self.hint = hint
        message = f"{self.path}: {reason}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


@dataclass(frozen=True)
class Volume:
    """A 3D scan: float32 voxel values (scale slope applied), its 4x4 affine and header facts."""

    data: np.ndarray
    affine: np.ndarray
    path: Path | None = None
    source_dtype: str = "float32"
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis."""
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        """Axis codes such as ``RAS`` or ``LAS``."""
        return "".join(nib.aff2axcodes(self.affine))

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    @property
    def name(self) -> str:
        return scan_name(self.path) if self.path is not None else "volume"


def scan_name(path: str | os.PathLike[str]) -> str:
    """File name without ``.nii`` / ``.nii.gz``."""
    base = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def is_nifti_path(path: str | os.PathLike[str]) -> bool:
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def max_volume_bytes(value_mb: float | None = None) -> int:
    """The memory budget of one volume in bytes: ``value_mb``, else ``$ANOMALY_MAX_VOLUME_MB``, else 1024 MB."""
    if value_mb is None:
        raw = os.environ.get(MAX_VOLUME_MB_ENV, "").strip()
        try:
            value_mb = float(raw) if raw else float(DEFAULT_MAX_VOLUME_MB)
        except ValueError:
            raise VolumeError(None, f"{MAX_VOLUME_MB_ENV}={raw!r} is not a number of MB",
                              f"set it to e.g. {DEFAULT_MAX_VOLUME_MB}, or unset it") from None
    if not (math.isfinite(value_mb) and value_mb > 0):
        raise VolumeError(None, f"memory budget {value_mb!r} MB must be a positive number", "give e.g. 1024")
    return int(value_mb * (1 << 20))


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Content hash of a file, the scan's identity in the store (a renamed copy is the same scan).

    A FIFO, device or socket raises :class:`~anomaly.fileio.NotRegularFileError` without blocking."""
    digest = hashlib.sha256()
    with open_regular(path) as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_volume(path: str | os.PathLike[str], max_bytes: int | None = None) -> Volume:
    """Read and validate a 3D NIfTI volume; raise :class:`VolumeError` naming the file and reason.

    Accepts ``.nii``/``.nii.gz``, any orientation, voxel size and data type; applies the scale
    slope/intercept and returns float32 values; squeezes a 4D/5D file that holds a single volume.
    A header that declares more voxel data than the file can hold, or than ``max_bytes`` (default
    :func:`max_volume_bytes`), is refused before anything is allocated.
    """
    path = Path(path)
    data, affine, dtype, notes = _read_nifti(path, max_bytes)
    if float(data.min()) == float(data.max()):
        value = float(data.flat[0])
        reason = (f"all {data.size} voxels are zero" if value == 0
                  else f"all {data.size} voxels have the same value {value:g}")
        raise VolumeError(path, f"{reason}: the image holds no signal",
                          "check the export or conversion that produced this file; an empty image cannot be scored")
    return Volume(data=data, affine=affine, path=path, source_dtype=dtype, warnings=tuple(notes))


#: A volume with no more whole-number values than this is a mask or label map, not an MRI scan (an 8-bit
#: scan still has hundreds of grey values).
LABEL_MAP_MAX_VALUES = 16
LABEL_MAP_HINT = ("leave masks and label maps out of the scan folders: give lesion masks to `anomaly evaluate "
                  "--labels` or `anomaly calibrate --labels`, and brain masks to `--brain-mask`")


def label_map_problem(volume: Volume) -> str | None:
    """Why ``volume`` looks like a mask or label map (lesion masks, tumour labels, brain masks, tissue
    segmentations: a few whole-number values) rather than a scan, or None. Costs a 200,000-voxel sample for
    a scan; only a volume whose sample has few values is looked at whole."""
    flat = np.ravel(volume.data, order="K")
    if np.unique(flat[:: max(1, flat.size // 200_000)]).size > LABEL_MAP_MAX_VALUES:
        return None
    values = np.unique(flat)
    if values.size > LABEL_MAP_MAX_VALUES or not np.array_equal(values, np.round(values)):
        return None
    shown = ", ".join(f"{v:g}" for v in values[:8]) + (", ..." if values.size > 8 else "")
    return f"looks like a mask or label map, not an MRI scan (only {values.size} whole-number values: {shown})"


def load_mask(path: str | os.PathLike[str], like: Volume | None = None, max_bytes: int | None = None) -> np.ndarray:
    """Read a label or mask NIfTI as a boolean array (any label > 0 is True).

    With ``like``, the mask must lie on the same grid as that scan: same shape and the same affine
    within 1e-3; an empty mask (no label at all) is allowed.
    """
    path = Path(path)
    data, affine, _, _ = _read_nifti(path, max_bytes)
    mask = data > 0
    del data
    if like is not None:
        where = f" {like.path}" if like.path is not None else ""
        if mask.shape != like.shape:
            raise VolumeError(path, f"mask shape {mask.shape} differs from the scan{where} shape {like.shape}",
                              "pair each scan with its own mask, or resample the mask onto the scan grid "
                              "(e.g. nilearn.image.resample_to_img(mask, scan, interpolation='nearest'))")
        diff = float(np.max(np.abs(affine - like.affine)))
        if diff > AFFINE_ATOL:
            raise VolumeError(
                path,
                f"mask affine differs from the scan{where} affine by up to {diff:.4g} (tolerance "
                f"{AFFINE_ATOL:g}); mask orientation {''.join(nib.aff2axcodes(affine))}, scan {like.orientation}",
                "the mask is on another grid: pair it with the right scan, or resample it onto the scan "
                "(e.g. nilearn.image.resample_to_img(mask, scan, interpolation='nearest'))")
    return mask


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike[str],
               dtype: np.dtype | type = np.float32) -> Path:
    """Write a NIfTI atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    image = nib.Nifti1Image(np.asarray(array, dtype=dtype), np.asarray(affine, dtype=np.float64))
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    compressed = path.name.endswith(".gz")
    with atomic_path(path, suffix=".nii.gz" if compressed else ".nii") as tmp:
        if compressed:  # one buffer through ISA-L: several times faster than nibabel's zlib stream
            tmp.write_bytes(gzipio.compress(image.to_bytes()))
        else:
            nib.save(image, str(tmp))
    return path


# --------------------------------------------------------------------------------------------------
# reading


def _read_nifti(path: Path, max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray, str, list[str]]:
    """Check the file, parse and validate the header, then read the voxels once (as float32)."""
    problem = path_problem(path)
    if problem == "file not found":
        raise VolumeError(path, "file not found", "check the path and the working folder")
    if problem == IS_FOLDER:
        raise VolumeError(path, "is a folder, not a NIfTI file", _HINT_NIFTI)
    if problem is not None and says_what_to_do(problem):
        raise VolumeError(path, problem)
    if problem is not None:
        raise VolumeError(path, problem, "give the path of a regular .nii/.nii.gz file: a FIFO, device or "
                          "broken link cannot be scored")
    budget = max_volume_bytes() if max_bytes is None else int(max_bytes)
    notes: list[str] = []
    try:
        with open_regular(path) as raw_handle:
            size = os.fstat(raw_handle.fileno()).st_size
            if size == 0:
                raise VolumeError(path, "file is empty (0 bytes)", _HINT_COPY_AGAIN)
            compressed = raw_handle.read(2) == _GZIP_MAGIC
            raw_handle.seek(0)
            named_gz = path.name.lower().endswith(".gz")
            if compressed and not named_gz:
                notes.append("file is gzip-compressed but its name does not end in .gz; read it as .nii.gz")
            elif named_gz and not compressed:
                notes.append("file is named .gz but is not gzip-compressed; read it as an uncompressed .nii")
            handle: BinaryIO = gzipio.reader(raw_handle) if compressed else raw_handle
            with handle:
                header = _read_header(path, handle)
                checked = _check_header(path, header, size, compressed, budget)
                notes.extend(checked.notes)
                raw = _read_voxels(path, header, handle, checked.shape_on_disk, compressed)
                data = _scale(path, raw, checked.slope, checked.inter)
                del raw
                if compressed:
                    _drain(path, handle)
    except VolumeError:
        raise
    except NotRegularFileError as exc:
        raise VolumeError(path, exc.strerror or "not a regular file", "give the path of a regular .nii/.nii.gz "
                          "file") from exc
    except EOFError as exc:
        raise VolumeError(path, "the gzip stream ends early: the .nii.gz file is truncated", _HINT_COPY_AGAIN
                          + " (`gzip -t FILE` checks a .gz file)") from exc
    except gzipio.CORRUPT_ERRORS as exc:
        raise VolumeError(path, f"corrupt gzip data ({exc})", _HINT_COPY_AGAIN
                          + " (`gzip -t FILE` checks a .gz file)") from exc
    except MemoryError as exc:
        raise VolumeError(path, "out of memory while reading the voxel data",
                          f"score it on a machine with more memory; the budget is set by {MAX_VOLUME_MB_ENV} "
                          "or --max-volume-mb") from exc
    except (OSError, ValueError, OverflowError) as exc:
        raise VolumeError(path, f"cannot read the voxel data ({type(exc).__name__}: {exc})",
                          _HINT_COPY_AGAIN) from exc
    data = data.reshape(checked.shape)
    if checked.squeezed:
        notes.append(f"stored as {len(checked.shape_on_disk)}D {checked.shape_on_disk} with a single volume; "
                     "used as 3D")
    _check_finite(path, data)
    return data, checked.affine, checked.dtype, notes


def _drain(path: Path, handle: BinaryIO) -> None:
    """Read to the end of a gzip stream so that its CRC and length are verified; a stream that goes on
    for more than ``TRAILING_LIMIT`` bytes after the voxels is refused rather than read to its end."""
    extra = 0
    while block := handle.read(1 << 20):
        extra += len(block)
        if extra > TRAILING_LIMIT:
            raise VolumeError(path, f"the gzip stream holds more than {TRAILING_LIMIT >> 20} MB after the voxel "
                              "data the header describes: the header and the data disagree",
                              "the header dimensions or data type are wrong, or the file is not one scan: "
                              "re-export the scan")


def _read_header(path: Path, handle: BinaryIO) -> nib.Nifti1Header:
    """Identify NIfTI-1/2 from the first bytes and parse its header without nibabel's silent fixes."""
    head = handle.read(544)
    handle.seek(0)
    kind = _nifti_kind(head)
    if kind is None:
        what, hint = _describe(path, head)
        raise VolumeError(path, f"not a NIfTI file: {what}", hint)
    if kind == "pair":
        raise VolumeError(path, "this is the header half of a NIfTI .hdr/.img pair (magic 'ni1'), not a "
                          "single-file NIfTI", "convert the pair to one .nii.gz file, e.g. "
                          "nib.save(nib.load('scan.hdr'), 'scan.nii.gz')")
    klass = nib.Nifti2Header if kind == "nifti2" else nib.Nifti1Header
    try:
        header = klass.from_fileobj(handle, check=False)
    except _STREAM_ERRORS:  # truncation and corrupt gzip: worded by the caller
        raise
    except Exception as exc:  # noqa: BLE001 - any header parse failure is a damaged header
        raise VolumeError(path, f"damaged NIfTI header ({type(exc).__name__}: {exc})", _HINT_COPY_AGAIN) from exc
    return header


def _nifti_kind(head: bytes) -> str | None:
    if len(head) >= 348:
        for order in ("<", ">"):
            sizeof_hdr = int(np.frombuffer(head[:4], dtype=f"{order}i4")[0])
            if sizeof_hdr == 348 and head[344:347] == b"n+1":
                return "nifti1"
            if sizeof_hdr == 348 and head[344:347] == b"ni1":
                return "pair"
            if sizeof_hdr == 540 and len(head) >= 540 and head[4:7] == b"n+2":
                return "nifti2"
    return None


def _describe(path: Path, head: bytes) -> tuple[str, str]:
    """Say what a non-NIfTI file looks like and how to get a NIfTI from it."""
    convert = "convert it to NIfTI (.nii.gz), e.g. with nibabel, mri_convert or dcm2niix"
    if not head:
        return "the file holds no data (an empty gzip stream)", _HINT_COPY_AGAIN
    if head.startswith(b"\x89PNG"):
        return "it is a PNG picture", "a 2D picture cannot be scored: supply the 3D scan as NIfTI"
    if head.startswith(b"\xff\xd8\xff"):
        return "it is a JPEG picture", "a 2D picture cannot be scored: supply the 3D scan as NIfTI"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "it is a DICOM file", "convert the DICOM series with dcm2niix (dcm2niix -z y -o OUT DICOM_DIR)"
    if head.startswith(b"PK\x03\x04"):
        return "it is a ZIP archive", "unpack it and pass the .nii/.nii.gz inside"
    if head.startswith(b"NRRD"):
        return "it is an NRRD file", convert
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<!doctype", b"<html", b"<?xml")):
        return "it is an HTML/XML page (often a download error page)", _HINT_COPY_AGAIN
    if len(head) >= 4 and int(np.frombuffer(head[:4], dtype=">i4")[0]) == 1 and len(head) >= 28:
        return "it looks like a FreeSurfer MGH/MGZ volume", convert
    if len(head) >= 4 and 348 in (int(np.frombuffer(head[:4], dtype=o)[0]) for o in ("<i4", ">i4")):
        return "it has an Analyze 7.5 or damaged NIfTI header (no 'n+1' magic)", convert
    sample = head[:200]
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in sample)
    if printable >= 0.95 * len(sample):
        text = sample[:40].decode("ascii", errors="replace").strip().replace("\n", " ")
        return f"it is a text file (starts with {text!r})", _HINT_NIFTI
    return f"unrecognised content (first bytes {head[:8].hex(' ')})", _HINT_NIFTI


@dataclass
class _Checked:
    shape_on_disk: tuple[int, ...]
    shape: tuple[int, int, int]
    squeezed: bool
    affine: np.ndarray
    dtype: str
    slope: float
    inter: float
    notes: list[str]


def _check_header(path: Path, header: nib.Nifti1Header, size: int, compressed: bool,
                  budget: int | None = None) -> _Checked:
    """Validate dimensions, data type, scaling, voxel sizes and affine before reading any voxel."""
    notes: list[str] = []
    dims = np.asarray(header["dim"], dtype=np.int64)
    ndim = int(dims[0])
    if not 1 <= ndim <= 7:
        raise VolumeError(path, f"damaged NIfTI header: dim[0] = {ndim} (must be 1..7)", _HINT_COPY_AGAIN)
    shape = tuple(int(d) for d in dims[1:ndim + 1])
    if any(d <= 0 for d in shape):
        raise VolumeError(path, f"damaged NIfTI header: non-positive dimension in shape {shape}", _HINT_COPY_AGAIN)
    spatial = shape[:3]
    hint_2d = ("supply the whole 3D volume; if the scanner exported one file per slice, convert the series "
               "into one volume (e.g. dcm2niix on the DICOM folder)")
    if ndim < 3:
        raise VolumeError(path, f"a 2D image of shape {shape}, not a 3D volume", hint_2d)
    singleton = [i for i, d in enumerate(spatial) if d == 1]
    if singleton:
        raise VolumeError(path, f"a single 2D slice of shape {spatial} (axis {singleton[0]} has one voxel), "
                          "not a 3D volume", hint_2d)
    extra = shape[3:]
    n_volumes = int(np.prod(extra)) if extra else 1
    if n_volumes > 1:
        if ndim == 4:
            reason = f"a 4D series with {n_volumes} volumes (shape {shape}), not a single 3D volume"
        else:
            reason = (f"a {ndim}D image holding {n_volumes} volumes or components (shape {shape}), "
                      "not a single 3D volume")
        raise VolumeError(path, reason, "split it into 3D volumes and score each one, e.g. `fslsplit FILE OUT -t` "
                          "or nibabel: [nib.save(img, f'vol{i}.nii.gz') for i, img in "
                          "enumerate(nib.four_to_three(nib.load(FILE)))]")
    small = [d for d in spatial if d < MIN_AXIS]
    large = [d for d in spatial if d > MAX_AXIS]
    if small or large:
        limit = f"fewer than {MIN_AXIS}" if small else f"more than {MAX_AXIS}"
        raise VolumeError(path, f"implausible shape {spatial}: an axis has {limit} voxels",
                          "supply a whole-brain 3D volume; check the header dimensions of the export")
    try:
        dtype = header.get_data_dtype()
    except Exception as exc:  # noqa: BLE001 - unknown datatype code
        raise VolumeError(path, f"unsupported NIfTI data type code {int(header['datatype'])} ({exc})",
                          "re-export the scan as integer or float data") from exc
    if dtype.fields is not None:
        raise VolumeError(path, f"a colour (RGB/RGBA) image ({dtype}), not a grey-value MRI volume",
                          "supply the grey-value scan; colour screenshots or overlays cannot be scored")
    if dtype.kind == "c":
        raise VolumeError(path, f"complex-valued data ({dtype})",
                          "supply the magnitude image (e.g. nib.Nifti1Image(np.abs(data), affine))")
    if dtype.kind not in "biuf":
        raise VolumeError(path, f"unsupported data type {dtype}", "re-export the scan as integer or float data")
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    if np.isinf(slope):
        raise VolumeError(path, f"scale slope scl_slope is {slope}",
                          "the header is damaged: fix scl_slope (e.g. with nibabel) or re-export the scan")
    if slope == 0 or np.isnan(slope):
        slope, inter = 1.0, 0.0
    elif not np.isfinite(inter):
        raise VolumeError(path, f"scale intercept scl_inter is {inter} while scl_slope is {slope:g}",
                          "the header is damaged: fix scl_inter (e.g. with nibabel) or re-export the scan")
    pixdim = np.asarray(header["pixdim"][1:4], dtype=np.float64)
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0):
        raise VolumeError(path, f"invalid voxel size in the header: pixdim {tuple(float(p) for p in pixdim)} "
                          "(each must be a positive number of mm)",
                          "the header is damaged: re-export the scan or set the voxel sizes "
                          "(nibabel: img.header.set_zooms(...))")
    affine, affine_notes = _choose_affine(path, header)
    notes.extend(affine_notes)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if np.any(spacing < MIN_SPACING_MM) or np.any(spacing > MAX_SPACING_MM):
        raise VolumeError(path, f"implausible voxel size {tuple(round(float(s), 4) for s in spacing)} mm "
                          f"(expected {MIN_SPACING_MM:g}..{MAX_SPACING_MM:g} mm)",
                          "check the units and voxel sizes in the header (pixdim, xyzt_units, sform); "
                          "re-export the scan with correct geometry")
    if not np.allclose(spacing, pixdim, rtol=0.01, atol=1e-3):
        notes.append(f"header pixdim {tuple(round(float(p), 4) for p in pixdim)} differs from the affine voxel "
                     f"size {tuple(round(float(s), 4) for s in spacing)}; the affine is used")
    offset = _data_offset(path, header)
    n_voxels = math.prod(shape)
    nbytes = n_voxels * dtype.itemsize
    if not compressed and size < offset + nbytes:
        raise VolumeError(path, f"file is truncated: the header describes {nbytes} bytes of voxel data from "
                          f"byte {offset}, but the file has {max(size - offset, 0)}", _HINT_COPY_AGAIN)
    capacity = size * DEFLATE_MAX_RATIO + 4096
    if compressed and offset + nbytes > capacity:
        raise VolumeError(path, f"the header declares {_mb(nbytes)} of voxel data (shape {shape}, {dtype}), more "
                          f"than a {size}-byte .nii.gz can hold (at most {_mb(capacity)} uncompressed): the file "
                          "is truncated or its header is damaged", _HINT_COPY_AGAIN)
    in_memory = max(nbytes, n_voxels * 4)
    if budget is not None and in_memory > budget:
        raise VolumeError(path, f"the volume needs {_mb(in_memory)} in memory (shape {shape}, {dtype}), more than "
                          f"the budget of {_mb(budget)}",
                          f"if the header is right, raise the budget (--max-volume-mb or {MAX_VOLUME_MB_ENV}) "
                          "on a machine with the memory, or downsample the scan; otherwise re-export it")
    return _Checked(shape_on_disk=shape, shape=cast(tuple[int, int, int], spatial), squeezed=len(shape) > 3, affine=affine,
                    dtype=str(dtype.newbyteorder("=")), slope=slope, inter=inter, notes=notes)


def _mb(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):,.1f} MB" if nbytes < (1 << 30) else f"{nbytes / (1 << 30):,.1f} GB"


def _data_offset(path: Path, header: nib.Nifti1Header) -> int:
    """Where the voxels start; a ``vox_offset`` inside the header or not a whole number is refused."""
    value = float(header["vox_offset"])
    minimum = int(header.single_vox_offset)
    if not math.isfinite(value) or value != int(value) or value < 0:
        raise VolumeError(path, f"damaged NIfTI header: vox_offset {value!r} is not a byte position",
                          _HINT_COPY_AGAIN)
    offset = int(value)
    if offset == 0:  # some writers leave it unset: the data follow the header
        return minimum
    if offset < minimum:
        raise VolumeError(path, f"damaged NIfTI header: vox_offset {offset} lies inside the {minimum}-byte header",
                          _HINT_COPY_AGAIN)
    return offset


def _affine_problem(affine: np.ndarray) -> str | None:
    if not np.all(np.isfinite(affine)):
        return "it has non-finite values"
    linear = affine[:3, :3]
    if not np.any(linear):
        return "it is all zero"
    if abs(np.linalg.det(linear)) < 1e-9 or np.linalg.cond(linear) > 1e8:
        return "it is singular"
    return None


def _choose_affine(path: Path, header: nib.Nifti1Header) -> tuple[np.ndarray, list[str]]:
    """The sform when usable, else the qform, else (both codes 0) the pixdim voxel sizes with a warning."""
    notes: list[str] = []
    problems: list[str] = []
    for name, code_field in (("sform", "sform_code"), ("qform", "qform_code")):
        if int(header[code_field]) <= 0:
            continue
        try:
            affine = np.asarray(header.get_sform() if name == "sform" else header.get_qform(), dtype=np.float64)
            problem = _affine_problem(affine)
        except Exception as exc:  # noqa: BLE001 - a quaternion nibabel cannot turn into a matrix
            problem = f"it cannot be computed ({exc})"
        if problem is None:
            if problems:
                notes.append(f"{'; '.join(problems)}: using the {name} instead")
            elif name == "sform":
                notes.extend(_qform_disagreement(header, affine))
            return affine, notes
        problems.append(f"the {name} is unusable ({problem})")
    if problems:
        raise VolumeError(path, f"unusable affine: {'; '.join(problems)}",
                          "fix the orientation in the header (e.g. `fslorient -copyqform2sform`, or nibabel "
                          "img.set_sform(affine, code=1)), or set sform_code and qform_code to 0 to fall back "
                          "on the voxel sizes")
    notes.append("no orientation in the header (qform_code and sform_code are 0): using the pixdim voxel sizes "
                 "with the default LAS orientation; left and right may be swapped")
    return np.asarray(header.get_base_affine(), dtype=np.float64), notes


def _qform_disagreement(header: nib.Nifti1Header, sform: np.ndarray) -> list[str]:
    """A warning when a usable qform points an axis the other way than the sform (e.g. left-right)."""
    if int(header["qform_code"]) <= 0:
        return []
    try:
        qform = np.asarray(header.get_qform(), dtype=np.float64)
    except Exception:  # noqa: BLE001 - an unusable qform is simply not compared
        return []
    if _affine_problem(qform) is not None:
        return []
    s_codes, q_codes = nib.aff2axcodes(sform), nib.aff2axcodes(qform)
    if s_codes == q_codes:
        return []
    flipped = {frozenset(pair): name for pair, name in ((("L", "R"), "left-right"), (("A", "P"), "front-back"),
                                                         (("S", "I"), "up-down"))}
    what = sorted({flipped[frozenset((a, b))] for a, b in zip(s_codes, q_codes, strict=True)
                   if frozenset((a, b)) in flipped})
    detail = f"disagree on {' and '.join(what)}" if what else "disagree on the axis order"
    return [f"the sform ({''.join(s_codes)}) and the qform ({''.join(q_codes)}) {detail}; the sform is used: "
            "check which one is right before trusting left and right (e.g. `fslorient -getsform/-getqform`)"]


def _read_voxels(path: Path, header: nib.Nifti1Header, handle: BinaryIO, shape: tuple[int, ...],
                 compressed: bool) -> np.ndarray:
    """The stored voxel array (memory-mapped for .nii, read once from the stream for .nii.gz)."""
    dtype = header.get_data_dtype()
    offset = _data_offset(path, header)
    if not compressed:
        return array_from_file(shape, dtype, cast(io.IOBase, handle), offset, order="F", mmap="r")
    nbytes = math.prod(shape) * dtype.itemsize
    handle.seek(offset)
    buffer = bytearray(nbytes)
    got = handle.readinto(buffer)  # type: ignore[attr-defined]
    while got < nbytes:
        more = handle.readinto(memoryview(buffer)[got:])  # type: ignore[attr-defined]
        if not more:
            raise VolumeError(path, f"file is truncated: the header describes {nbytes} bytes of voxel data "
                              f"from byte {offset}, but the decompressed file has {got}", _HINT_COPY_AGAIN)
        got += more
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order="F")


def _scale(path: Path, raw: np.ndarray, slope: float, inter: float) -> np.ndarray:
    """float32 copy of the stored values with slope and intercept applied."""
    data = np.array(raw, dtype=np.float32, order="F")
    if slope != 1.0:
        data *= np.float32(slope)
    if inter != 0.0:
        data += np.float32(inter)
    return data


def _check_finite(path: Path, data: np.ndarray) -> None:
    finite = np.isfinite(data)
    if finite.all():
        return
    n_nan = int(np.isnan(data).sum())
    n_inf = int(data.size - finite.sum()) - n_nan
    parts = [f"{n} {what}" for n, what in ((n_nan, "NaN"), (n_inf, "infinite")) if n]
    raise VolumeError(path, f"{' and '.join(parts)} voxel values (of {data.size})",
                      "the export or a processing step produced invalid values; replace them "
                      "(e.g. np.nan_to_num) or re-export the scan")

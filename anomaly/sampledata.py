"""Sample data from brains that installed packages ship: healthy scans, copies with synthetic lesions, labels.

Sources: the MNI152 2009c symmetric T1 template inside the ``nilearn`` package, and the Colin27 single
subject (``ch2bet.nii.gz``) of Debian's ``mricron-data`` package when it is installed. Colin27 is the
project's held-out evaluation brain: it is never to be used for training.
"""

from __future__ import annotations

import importlib.resources
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from anomaly.fileio import write_text_atomic
from anomaly.synth import add_lesions
from anomaly.volume import Volume, load_volume, save_nifti

MNI_NAME = "mni152_2009c_t1"
COLIN_NAME = "colin27_t1"
MNI_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
MNI_GM_FILE = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
MNI_WM_FILE = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
COLIN_PATH = Path("/usr/share/mricron/templates/ch2bet.nii.gz")
LESIONS_PER_COPY = 3
#: The sample brains are T1, and on T1 lesions are mostly darker than normal tissue (MS black holes,
#: cysts, necrosis): the kind the shipped model's T1 map looks for. The other kinds of
#: :mod:`anomaly.synth` (bright, mass, texture, swap) stay available to tests and benchmarks.
SAMPLE_KINDS: tuple[str, ...] = ("hypointense",)
LESION_RADIUS_MM = (4.0, 12.0)


@dataclass(frozen=True)
class SampleManifest:
    """What :func:`make_sample_data` wrote (or found already present) in ``out_dir``."""

    out_dir: Path
    healthy: tuple[Path, ...]
    lesions: tuple[Path, ...]
    labels: tuple[Path, ...]
    readme: Path
    evaluation_only: tuple[Path, ...] = ()
    notes: tuple[str, ...] = ()
    calibration: tuple[Path, ...] = ()


@dataclass(frozen=True)
class _Source:
    name: str
    path: Path
    origin: str
    evaluation_only: bool


def nilearn_data_dir() -> Path:
    """The folder of data files inside the installed ``nilearn`` package."""
    return Path(str(importlib.resources.files("nilearn") / "datasets" / "data"))


def mni152_path() -> Path:
    """Path of the MNI152 2009c T1 template that ``nilearn`` ships; FileNotFoundError when missing."""
    path = nilearn_data_dir() / MNI_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the MNI152 template is missing from the nilearn package "
                                "(reinstall it: pip install --force-reinstall nilearn)")
    return path


def colin27_path() -> Path | None:
    """Path of Colin27 ``ch2bet.nii.gz`` from Debian's ``mricron-data``, or None when not installed."""
    return COLIN_PATH if COLIN_PATH.is_file() else None


def load_mni152_brain() -> tuple[Volume, str]:
    """The MNI152 template, skull-stripped with a zero background, and a note on how that was checked.

    The template is distributed skull-stripped; this is verified against its grey+white matter
    probability maps, and a mask built from them is applied if tissue lies outside the brain.
    """
    volume = load_volume(mni152_path())
    data_dir = nilearn_data_dir()
    tissue = np.zeros(volume.shape, dtype=np.float32)
    for name in (MNI_GM_FILE, MNI_WM_FILE):
        tissue += load_volume(data_dir / name).data
    scale = 255.0 if tissue.max() > 2 else 1.0
    brain = ndimage.binary_fill_holes(ndimage.binary_dilation(tissue > 0.1 * scale, iterations=2))
    nonzero = volume.data != 0
    outside = float((nonzero & ~brain).sum()) / max(int(nonzero.sum()), 1)
    if outside <= 0.02:
        return volume, (f"already skull-stripped (only {outside:.1%} of its non-zero voxels lie outside "
                        "the dilated grey+white matter mask)")
    stripped = np.where(brain, volume.data, 0).astype(np.float32)
    return (Volume(data=stripped, affine=volume.affine, path=volume.path, source_dtype=volume.source_dtype,
                   warnings=volume.warnings),
            f"skull-stripped here with its grey+white matter maps ({outside:.1%} of voxels were outside)")


def make_sample_data(out_dir: Path, *, include_colin: bool = True, n_lesion_copies: int = 2,
                     seed: int = 0, n_calibration: int = 6) -> SampleManifest:
    """Write healthy brains, lesion copies and ground-truth labels into ``out_dir``; return the manifest.

    Layout: ``healthy/<name>.nii.gz`` (skull-stripped originals), ``lesions/<name>_lesion<k>.nii.gz``
    (copies with synthetic lesions), ``labels/<name>_lesion<k>.nii.gz`` (uint8 ground truth, named like
    the scans), ``calibration/mni152_2009c_t1_var<k>.nii.gz`` (healthy variants of the MNI brain for label-free
    threshold calibration; never of Colin27) and ``README.txt``. Files already present are kept (not recomputed); writes are atomic.
    """
    out_dir = Path(out_dir)
    if n_lesion_copies < 0:
        raise ValueError(f"n_lesion_copies must be >= 0, got {n_lesion_copies}")
    notes: list[str] = []
    sources = [_Source(MNI_NAME, mni152_path(), "MNI ICBM152 2009c nonlinear symmetric T1 template (1 mm, "
                       f"skull-stripped, checked against its grey/white matter maps), file {MNI_FILE} shipped "
                       "inside the nilearn package", evaluation_only=False)]
    if include_colin:
        colin = colin27_path()
        if colin is None:
            notes.append(f"Colin27 skipped: {COLIN_PATH} not found (install the Debian package mricron-data)")
        else:
            sources.append(_Source(COLIN_NAME, colin, f"Colin27 single-subject T1 (1 mm, skull-stripped), {colin} "
                                   "from the Debian package mricron-data", evaluation_only=True))
    healthy: list[Path] = []
    lesions: list[Path] = []
    labels: list[Path] = []
    evaluation_only: list[Path] = []
    for source in sources:
        scan_path = out_dir / "healthy" / f"{source.name}.nii.gz"
        pairs = [(out_dir / "lesions" / f"{source.name}_lesion{k}.nii.gz",
                  out_dir / "labels" / f"{source.name}_lesion{k}.nii.gz") for k in range(1, n_lesion_copies + 1)]
        missing = [pair for pair in pairs if not (pair[0].is_file() and pair[1].is_file())]
        volume: Volume | None = None
        if not scan_path.is_file() or missing:
            volume = _load_source(source, notes)
        if volume is not None and not scan_path.is_file():
            save_nifti(volume.data, volume.affine, scan_path)
        for k, (lesion_path, label_path) in enumerate(pairs, start=1):
            if volume is not None and (lesion_path, label_path) in missing:
                rng = np.random.default_rng([seed, zlib.crc32(source.name.encode()), k])
                data, truth = add_lesions(volume.data, volume.data > 0, volume.spacing, kinds=SAMPLE_KINDS,
                                          n=LESIONS_PER_COPY, seed=rng, radius_mm=LESION_RADIUS_MM)
                save_nifti(truth, volume.affine, label_path, dtype=np.uint8)
                save_nifti(data, volume.affine, lesion_path)
        files = [scan_path, *(p for pair in pairs for p in pair)]
        healthy.append(scan_path)
        lesions.extend(p[0] for p in pairs)
        labels.extend(p[1] for p in pairs)
        if source.evaluation_only:
            evaluation_only.extend(files)
    calibration = _calibration_variants(out_dir / "calibration", sources[0], n_calibration, seed, notes)
    readme = _write_text(out_dir / "README.txt", _readme(sources, n_lesion_copies, seed, n_calibration))
    return SampleManifest(out_dir=out_dir, healthy=tuple(healthy), lesions=tuple(lesions), labels=tuple(labels),
                          readme=readme, evaluation_only=tuple(evaluation_only), notes=tuple(notes),
                          calibration=calibration)


def _calibration_variants(folder: Path, source: _Source, n: int, seed: int, notes: list[str]) -> tuple[Path, ...]:
    """Healthy variants (bias field, gain, shift, noise) of one training-allowed brain, for calibration."""
    paths = tuple(folder / f"{source.name}_var{k}.nii.gz" for k in range(1, n + 1))
    if n and not all(p.is_file() for p in paths):
        volume = _load_source(source, notes)
        for path, data in zip(paths, healthy_variants(volume, n, seed), strict=True):
            if not path.is_file():
                save_nifti(data, volume.affine, path)
    return paths


def healthy_variants(volume: Volume, n: int, seed: int | None = 0) -> list[np.ndarray]:
    """``n`` plausible, distinct healthy scans made from one skull-stripped brain, for calibration tests.

    Each variant applies a smooth multiplicative bias field (a random quadratic in space), a global
    intensity scaling of +-8 %, a shift of up to 1.5 mm per axis and Rician noise of 1-3 % of the bright end.
    They share the template's anatomy: they model acquisition differences, not other people. The
    background (voxels equal to 0) stays 0. Arrays are float32 on the volume's own grid and affine.
    """
    data = np.ascontiguousarray(volume.data, dtype=np.float32)  # scipy shifts C-ordered arrays much faster
    brain = data != 0
    if not brain.any():
        raise ValueError(f"{volume.name}: the volume is empty; healthy variants need a skull-stripped brain")
    bright = float(np.percentile(data[brain], 99))
    spacing = np.asarray(volume.spacing)
    axes = [np.linspace(-1.0, 1.0, size, dtype=np.float32).reshape([-1 if a == i else 1 for a in range(3)])
            for i, size in enumerate(data.shape)]
    terms = [axes[0], axes[1], axes[2], axes[0] * axes[1], axes[0] * axes[2], axes[1] * axes[2],
             axes[0] ** 2, axes[1] ** 2, axes[2] ** 2]
    rng = np.random.default_rng(seed)
    variants: list[np.ndarray] = []
    for _ in range(n):
        coefficients = rng.normal(0.0, 0.03, len(terms))
        field = np.zeros(data.shape, dtype=np.float32)
        for c, term in zip(coefficients, terms, strict=True):
            field += np.float32(c) * term
        gain = np.float32(rng.uniform(0.92, 1.08))
        offset = rng.uniform(-1.5, 1.5, 3) / spacing  # up to 1.5 mm along each axis, in voxels
        moved = ndimage.shift(data, offset, order=1, prefilter=False, mode="constant", cval=0.0)
        inside = moved > 0
        sigma = np.float32(rng.uniform(0.01, 0.03) * bright)
        signal = moved * np.exp(field) * gain
        real = signal + sigma * rng.standard_normal(data.shape, dtype=np.float32)
        imaginary = sigma * rng.standard_normal(data.shape, dtype=np.float32)
        variant = np.where(inside, np.sqrt(real * real + imaginary * imaginary), 0).astype(np.float32)
        variants.append(variant)
    return variants


# --------------------------------------------------------------------------------------------------


def _load_source(source: _Source, notes: list[str]) -> Volume:
    if source.name != MNI_NAME:
        return load_volume(source.path)
    volume, how = load_mni152_brain()
    if how.startswith("skull-stripped here"):
        notes.append(f"{MNI_NAME}: {how}")
    return volume


def _write_text(path: Path, text: str) -> Path:
    """Write a text file atomically, leaving it untouched when the content is already the same."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return path
    return write_text_atomic(path, text)


def _readme(sources: list[_Source], n_copies: int, seed: int, n_calibration: int = 0) -> str:
    lines = [
        "Sample brain MRI data for trying out and testing brain anomaly detection.",
        "",
        "Folders:",
        "  healthy/<name>.nii.gz          healthy T1 brains, skull-stripped, zero background, float32, 1 mm",
        "  lesions/<name>_lesion<k>.nii.gz  copies of those brains with synthetic lesions painted in",
        "  labels/<name>_lesion<k>.nii.gz   ground truth for each lesion copy (uint8, 1 = lesion), named like",
        "                                   the scan it belongs to, on the same grid",
        f"  calibration/<name>_var<k>.nii.gz {n_calibration} healthy variants of the MNI brain (smooth bias field,",
        "                                   gain, sub-voxel shift, noise) for label-free threshold calibration",
        "",
        f"Each lesion copy holds {LESIONS_PER_COPY} synthetic lesions (radius {LESION_RADIUS_MM[0]:g}-"
        f"{LESION_RADIUS_MM[1]:g} mm) of these kinds: {', '.join(SAMPLE_KINDS)}: darker than any normal",
        "tissue, as MS black holes, cysts and necrosis are on T1 (the kind a T1 map looks for; bright,",
        "mass-like and in-range kinds are in anomaly.synth for tests and benchmarks).",
        f"They are generated deterministically (seed {seed}, {n_copies} copies per brain). The labels mark the",
        "voxels at or above half of each lesion's contrast. Synthetic lesions are a test aid, not pathology.",
        "",
        "Sources:",
    ]
    for source in sources:
        lines.append(f"  {source.name}: {source.origin}")
        if source.evaluation_only:
            lines.append("    EVALUATION ONLY: Colin27 is the held-out evaluation brain; never train a model on "
                         f"any {source.name}* file.")
    lines += ["", "MNI152 2009c: Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal",
              "Neurological Institute, McGill University (free to use and redistribute with this notice).",
              "Colin27: Holmes et al. 1998, distributed with the mricron-data package."]
    return "\n".join(lines) + "\n"

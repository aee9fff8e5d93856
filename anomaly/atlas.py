"""MNI-space label atlases (AAL, Harvard-Oxford cortical, JHU white matter) and a test of whether a
scan lives in MNI space, so findings can be named by brain region only when that is meaningful.

The atlases come from Debian's ``mricron-data`` package (``/usr/share/mricron/templates``); the
Harvard-Oxford label names, which that package does not ship, are in ``anomaly/assets/atlases``.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
from nibabel.spatialimages import SpatialImage

TEMPLATE_DIR = Path("/usr/share/mricron/templates")
ASSET_DIR = Path(__file__).resolve().parent / "assets" / "atlases"
OUTSIDE = "outside atlas"
"""Label of atlas background (value 0) inside the atlas grid."""
INSTALL_HINT = "install the atlases with `apt-get install mricron-data`"


class AtlasError(FileNotFoundError):
    """An atlas that cannot be loaded: unknown name or missing files, with what to do about it."""


def _read_label_file(path: Path) -> dict[int, str]:
    """Label table: one ``VALUE<tab>NAME`` or ``VALUE NAME [CODE]`` line per label (AAL's .txt style)."""
    labels: dict[int, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) < 2 or not fields[0].strip().lstrip("-").isdigit():
            continue
        labels[int(fields[0])] = fields[1].strip()
    return labels


@dataclass(frozen=True)
class AtlasSpec:
    """Where one atlas's label image and label names live."""

    name: str
    image: str
    labels: Callable[[Path], Path]
    description: str

    def image_path(self, template_dir: Path) -> Path:
        """The label image inside ``template_dir``."""
        return template_dir / self.image


ATLASES: dict[str, AtlasSpec] = {
    spec.name: spec
    for spec in (
        AtlasSpec("aal", "aal.nii.gz", lambda d: d / "aal.nii.txt",
                  "Automated Anatomical Labeling, 116 regions"),
        AtlasSpec("harvard-oxford-cortical", "HarvardOxford-cort-maxprob-thr0-1mm.nii.gz",
                  lambda d: ASSET_DIR / "harvard_oxford_cortical.txt",
                  "Harvard-Oxford cortical maximum-probability atlas, 48 regions"),
        AtlasSpec("jhu-white-matter", "JHU-WhiteMatter-labels-1mm.nii.gz",
                  lambda d: d / "JHU-WhiteMatter-labels-1mm.nii.txt",
                  "JHU ICBM-DTI-81 white-matter labels, 48 tracts"),
    )
}


@dataclass(frozen=True)
class Atlas:
    """A label volume in MNI space with its affine and label names; looked up by world position (mm)."""

    name: str
    data: np.ndarray
    affine: np.ndarray
    labels: dict[int, str]
    path: Path | None = None

    def label_name(self, value: int) -> str:
        """Name of a label value: ``OUTSIDE`` for 0, ``'label N'`` for a value the table lacks."""
        if value == 0:
            return OUTSIDE
        return self.labels.get(int(value), f"label {int(value)}")

    def values_at(self, world_mm: np.ndarray) -> np.ndarray:
        """Label values at world points ``(N, 3)`` (nearest voxel); -1 where a point is off the grid."""
        points = np.asarray(world_mm, dtype=np.float64).reshape(-1, 3)
        ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(self.affine), points)).astype(np.int64)
        inside = np.all((ijk >= 0) & (ijk < np.asarray(self.data.shape)), axis=1)
        values = np.full(points.shape[0], -1, dtype=np.int64)
        values[inside] = self.data[tuple(ijk[inside].T)]
        return values

    def label_at(self, world_xyz_mm: tuple[float, float, float] | np.ndarray) -> str | None:
        """Region at one world point; ``OUTSIDE`` on background, ``None`` off the atlas grid."""
        value = int(self.values_at(np.asarray(world_xyz_mm))[0])
        return None if value < 0 else self.label_name(value)

    def majority_label(self, world_coords_mm: np.ndarray) -> str | None:
        """Most frequent region over the points on the grid (background counts; ties go to the lower value).

        ``None`` when no point lies on the atlas grid.
        """
        values = self.values_at(world_coords_mm)
        values = values[values >= 0]
        if values.size == 0:
            return None
        counts = np.bincount(values)
        return self.label_name(int(np.argmax(counts)))


def available_atlases(template_dir: str | Path | None = None) -> list[str]:
    """Names of the atlases whose image and label files are present."""
    folder = Path(template_dir) if template_dir is not None else TEMPLATE_DIR
    return [name for name, spec in ATLASES.items()
            if spec.image_path(folder).is_file() and spec.labels(folder).is_file()]


@functools.lru_cache(maxsize=8)
def _load(name: str, folder: Path) -> Atlas:
    spec = ATLASES[name]
    image_path, label_path = spec.image_path(folder), spec.labels(folder)
    for path in (image_path, label_path):
        if not path.is_file():
            raise AtlasError(f"atlas {name!r}: {path} is missing; {INSTALL_HINT}")
    image = cast(SpatialImage, nib.load(str(image_path)))
    data = np.asarray(image.dataobj)
    if data.ndim != 3 or data.dtype.kind not in "iu":
        raise AtlasError(f"atlas {name!r}: {image_path} is not a 3D integer label volume; reinstall mricron-data")
    data = data.astype(np.int32 if data.dtype.itemsize >= 2 else np.int16)
    data.setflags(write=False)
    affine = np.asarray(image.affine, dtype=np.float64)
    affine.setflags(write=False)
    return Atlas(name=name, data=data, affine=affine, labels=_read_label_file(label_path), path=image_path)


def load_atlas(name: str = "aal", *, template_dir: str | Path | None = None,
               missing_ok: bool = False) -> Atlas | None:
    """Load (once, then from a cache) a label atlas by name; see :data:`ATLASES` for the names.

    Raises :class:`AtlasError` when the name is unknown or its files are missing, or returns ``None``
    for missing files when ``missing_ok`` is true.
    """
    if name not in ATLASES:
        raise AtlasError(f"unknown atlas {name!r}; choose one of {sorted(ATLASES)}")
    folder = Path(template_dir) if template_dir is not None else TEMPLATE_DIR
    try:
        return _load(name, folder)
    except AtlasError:
        if missing_ok:
            return None
        raise


# --- is this scan in MNI space? -------------------------------------------------------------------

MNI_TISSUE_THRESHOLD = 0.3
"""Grey + white matter probability above which a template voxel counts as brain."""
MNI_CORE_MARGIN_MM = 8.0
"""Depth inside the template brain of the core that any MNI-registered brain mask should cover."""
SAMPLE_POINTS = 20000


@dataclass(frozen=True)
class _MniTemplate:
    mask: np.ndarray
    affine: np.ndarray
    centroid: np.ndarray
    core_points: np.ndarray


def _nilearn_data_dir() -> Path:
    """Folder of nilearn's packaged templates, found without importing nilearn (it pulls in scikit-learn)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise AtlasError("the MNI152 template ships with nilearn, which is not installed; `pip install nilearn`")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


@functools.lru_cache(maxsize=1)
def _mni_template() -> _MniTemplate:
    from scipy import ndimage

    folder = _nilearn_data_dir()
    tissue: np.ndarray | None = None
    affine: np.ndarray | None = None
    for kind in ("gm", "wm"):
        path = folder / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"
        if not path.is_file():
            raise AtlasError(f"MNI152 template {path} is missing; reinstall nilearn (`pip install --force-reinstall nilearn`)")
        image = cast(SpatialImage, nib.load(str(path)))
        part = np.asarray(image.dataobj, dtype=np.float32)
        part /= 255.0 if part.max() > 1.0 else 1.0  # packaged as uint8 probabilities
        tissue = part if tissue is None else tissue + part
        affine = np.asarray(image.affine, dtype=np.float64)
    assert tissue is not None and affine is not None
    mask = np.asarray(tissue > MNI_TISSUE_THRESHOLD)
    # the core is found on every second voxel: a smooth deep region, and the distance transform is 8x cheaper
    coarse_affine = affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    depth = ndimage.distance_transform_edt(mask[::2, ::2, ::2],
                                           sampling=np.sqrt((coarse_affine[:3, :3] ** 2).sum(axis=0)))
    core = np.argwhere(depth > MNI_CORE_MARGIN_MM)
    rng = np.random.default_rng(0)
    core = core[rng.choice(core.shape[0], min(SAMPLE_POINTS, core.shape[0]), replace=False)]
    centroid = nib.affines.apply_affine(affine, np.argwhere(mask).mean(axis=0))
    mask.setflags(write=False)
    return _MniTemplate(mask, affine, centroid, nib.affines.apply_affine(coarse_affine, core))


def _inside(mask: np.ndarray, affine: np.ndarray, world: np.ndarray) -> np.ndarray:
    ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(affine), world)).astype(np.int64)
    ok = np.all((ijk >= 0) & (ijk < np.asarray(mask.shape)), axis=1)
    out = np.zeros(world.shape[0], dtype=bool)
    out[ok] = mask[tuple(ijk[ok].T)]
    return out


def mni_overlap(brain_mask: np.ndarray, affine: np.ndarray) -> dict[str, float]:
    """The three measures :func:`is_mni_space` decides on.

    ``scan_in_mni``: fraction of the scan's brain voxels (a fixed random subsample) whose world
    position falls in the MNI152 brain (grey + white matter probability > 0.3); ``mni_core_in_scan``:
    fraction of the MNI brain core (deeper than 8 mm) that falls in the scan's brain mask (the core,
    not the whole brain, so a smaller registered brain still covers it); ``centroid_shift_mm``:
    distance between the two brains' centroids.
    """
    brain = np.asarray(brain_mask, dtype=bool)
    if brain.ndim != 3 or not brain.any():
        raise ValueError(f"is_mni_space: the brain mask must be a non-empty 3D mask, got shape {brain.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    template = _mni_template()
    flat = np.flatnonzero(brain)
    centroid = nib.affines.apply_affine(affine, np.mean(np.unravel_index(flat, brain.shape), axis=1))
    rng = np.random.default_rng(0)
    if flat.size > SAMPLE_POINTS:
        flat = rng.choice(flat, SAMPLE_POINTS, replace=False)
    points = nib.affines.apply_affine(affine, np.stack(np.unravel_index(flat, brain.shape), axis=1))
    return {
        "scan_in_mni": float(_inside(template.mask, template.affine, points).mean()),
        "mni_core_in_scan": float(_inside(brain, affine, template.core_points).mean()),
        "centroid_shift_mm": float(np.linalg.norm(centroid - template.centroid)),
    }


def is_mni_space(brain_mask: np.ndarray, affine: np.ndarray, *, min_overlap: float = 0.75,
                 max_centroid_shift_mm: float = 10.0) -> bool:
    """Whether a scan's world coordinates are MNI coordinates, judged from its brain mask.

    True when both overlaps of :func:`mni_overlap` reach ``min_overlap`` and the centroids lie within
    ``max_centroid_shift_mm``. Measured on MNI-registered brains (three MS patients, Colin27): scan in
    MNI 0.95 to 0.97, MNI core in scan 0.81 to 1.0, shift 0.7 to 6.1 mm. Colin27 moved by 10 mm still
    overlaps 0.88 (hence the centroid test), by 20 mm 0.78; BraTS volumes in their own header space
    overlap 0. Rotations of up to about 15 degrees about the centre pass: the test keeps region names
    away from scans in scanner coordinates; it does not grade the quality of a registration.
    """
    measures = mni_overlap(brain_mask, affine)
    return (measures["scan_in_mni"] >= min_overlap and measures["mni_core_in_scan"] >= min_overlap
            and measures["centroid_shift_mm"] <= max_centroid_shift_mm)

"""Brain extraction of heads with skull, on the scan's own grid, and the user's own brain masks.

The extractor is deepbet (MIT; its two 3D networks ship inside its PyPI wheel, so nothing is
downloaded at run time). The volume is only reoriented (flips and axis swaps, no resampling) for the
networks, so the mask comes back on exactly the input's voxels. A mask that is no plausible brain
(volume, extent) is refused with a message that says what to do instead.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from anomaly.volume import NIFTI_SUFFIXES, Volume, VolumeError, load_mask, scan_name

SKULL_STRIP_MODES = ("auto", "force", "skip", "mask")
"""``auto``: strip when the volume looks like a head; ``force``: always; ``skip``: never;
``mask``: the user's own masks (``--brain-mask``)."""

MIN_BRAIN_ML = 600.0
MAX_BRAIN_ML = 2400.0
MIN_EXTENT_MM = 70.0
MAX_EXTENT_MM = 230.0
MIN_FILL = 0.6
MAX_FILL = 1.3
HEAD_PROBE_MM = 2.0
_LOCK = threading.Lock()
"""deepbet keeps the last bounding box on its object between its two steps: one scan at a time."""
_INSTALL_HINT = ("install it with `pip install --no-deps deepbet==1.0.2` and `pip install connected-components-3d "
                 "fill_voids` (as `make setup` does)")


class StageUnavailable(RuntimeError):
    """A preprocessing stage whose package is not installed or not the expected one; says what to install."""


@dataclass(frozen=True)
class BrainMaskResult:
    """A brain mask on the volume's own grid, how it was made and what it cost."""

    mask: np.ndarray
    method: str
    volume_ml: float
    seconds: float


def foreground_ml(volume: Volume, tolerance: float = 0.01) -> float:
    """Volume (mL) of the largest non-background component, probed on a ~2 mm subgrid: a head with
    skull and scalp is far larger than any brain, which is how ``auto`` recognises one."""
    from anomaly.preprocess import BrainMask

    step = [max(1, int(round(HEAD_PROBE_MM / s))) for s in volume.spacing]
    probe = np.ascontiguousarray(volume.data[::step[0], ::step[1], ::step[2]], dtype=np.float32)
    import torch

    mask = BrainMask(tolerance)(torch.from_numpy(probe)[None])
    return float(mask.sum()) * volume.voxel_volume_ml * float(np.prod(step))


def brain_fill(mask: np.ndarray, affine: np.ndarray) -> float:
    """Mask volume over that of the ellipsoid inscribed in its world extent: about 0.8-1.0 for a brain,
    far less for scattered pieces or a thin shell, about 1.9 for a box (the whole field of view)."""
    extent = _extent_mm(mask, affine)
    ellipsoid = np.pi / 6 * float(np.prod(extent))
    return float(mask.sum()) * float(abs(np.linalg.det(affine[:3, :3]))) / ellipsoid if ellipsoid > 0 else 0.0


def check_plausible_brain(mask: np.ndarray, volume: Volume, method: str) -> None:
    """Refuse a mask whose volume, extent or compactness no adult brain has (the method failed on this scan)."""
    ml = float(mask.sum()) * volume.voxel_volume_ml
    extent = _extent_mm(mask, volume.affine)
    fill = brain_fill(mask, volume.affine)
    if (MIN_BRAIN_ML <= ml <= MAX_BRAIN_ML and all(MIN_EXTENT_MM <= e <= MAX_EXTENT_MM for e in extent)
            and MIN_FILL <= fill <= MAX_FILL):
        return
    raise VolumeError(
        volume.path,
        f"brain extraction ({method}) found no plausible brain: {ml:.0f} mL, extent "
        f"{' x '.join(f'{e:.0f}' for e in extent)} mm, fill {fill:.2f} (expected {MIN_BRAIN_ML:.0f}-"
        f"{MAX_BRAIN_ML:.0f} mL, {MIN_EXTENT_MM:.0f}-{MAX_EXTENT_MM:.0f} mm per axis, fill {MIN_FILL}-{MAX_FILL})",
        "give this scan's brain mask with --brain-mask, or strip it with another tool and score it with "
        "--skull-strip skip")


def _extent_mm(mask: np.ndarray, affine: np.ndarray) -> tuple[float, float, float]:
    """Extent of the mask along the world axes (mm), from its voxel corners."""
    idx = np.argwhere(mask)
    if idx.size == 0:
        return (0.0, 0.0, 0.0)
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])], float)
    world = nib.affines.apply_affine(affine, corners)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    return tuple(float(v) for v in world.max(axis=0) - world.min(axis=0) + spacing.min())  # type: ignore[return-value]


@functools.lru_cache(maxsize=1)
def _extractor() -> object:
    """deepbet's extractor with its two networks built in Python from safetensors (see
    :mod:`anomaly.brain_net`): no TorchScript is loaded, no pickled code runs. The first use converts the
    SHA-256 pinned archives of the installed wheel into the user cache; later ones only read that."""
    try:
        import torch
        from deepbet import BrainExtraction
        from deepbet.utils import DATA_PATH
    except ImportError as exc:
        raise StageUnavailable(f"brain extraction needs the deepbet package ({exc}); {_INSTALL_HINT}") from exc
    from anomaly.brain_net import WEIGHT_NAMES, WeightsError, cached_networks

    archives = {name: Path(DATA_PATH) / "models" / f"{name}.pt" for name in WEIGHT_NAMES}
    try:
        nets = cached_networks(archives)
    except WeightsError as exc:
        raise StageUnavailable(f"{exc}; {_INSTALL_HINT}") from exc
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bet = BrainExtraction.__new__(BrainExtraction)  # its __init__ would torch.jit.load the archives
    bet.model, bet.bbox_model, bet.bbox = nets["model"].to(device), nets["bbox_model"].to(device), None
    return bet


def strip_skull(volume: Volume, *, size: int = 192, threshold: float = 0.5, check: bool = True) -> BrainMaskResult:
    """Brain mask of a head with skull, on the volume's own grid (a library entry point the training
    pipeline can use to strip healthy heads too). ``size`` is the cube (voxels) the brain's bounding box
    is resampled to for the network (deepbet's own is 256; 192 measures the same Dice at half the time)."""
    import torch

    t0 = time.perf_counter()
    bet = _extractor()
    ornt = nib.io_orientation(volume.affine)
    canonical = nib.apply_orientation(np.asarray(volume.data, dtype=np.float32), ornt)
    try:
        with _LOCK, torch.inference_mode():
            prob = bet.run_model(np.ascontiguousarray(canonical), shape=(size, size, size))  # type: ignore[attr-defined]
            mask = bet.postprocess(prob > threshold)  # type: ignore[attr-defined]
    except (AssertionError, ValueError) as exc:  # deepbet asserts when it finds no head at all
        raise VolumeError(volume.path, f"brain extraction (deepbet) found no brain: {exc or 'empty result'}",
                          "check that the file holds a head MRI, or give its brain mask with --brain-mask") from exc
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), ornt)
    native = np.ascontiguousarray(nib.apply_orientation(np.asarray(mask, dtype=bool), back))
    if check:
        check_plausible_brain(native, volume, "deepbet")
    return BrainMaskResult(native, "deepbet", float(native.sum()) * volume.voxel_volume_ml,
                           time.perf_counter() - t0)


def find_user_mask(spec: str | os.PathLike[str], scan: Path) -> Path:
    """The user's mask for ``scan``: ``spec`` itself when it is a file, else the file in folder ``spec``
    named like the scan (``<name>``, ``<name>_mask``, ``<name>_brain``, ``<name>_brain_mask``, ``<name>_brainmask``)."""
    spec = Path(spec)
    if spec.is_file():
        return spec
    if not spec.is_dir():
        raise VolumeError(spec, "brain mask file or folder not found", "check the --brain-mask path")
    name = scan_name(scan)
    for suffix in ("", "_mask", "_brain", "_brain_mask", "_brainmask", "_desc-brain_mask"):
        for ext in NIFTI_SUFFIXES:
            candidate = spec / f"{name}{suffix}{ext}"
            if candidate.is_file():
                return candidate
    raise VolumeError(scan, f"no brain mask for this scan in {spec}",
                      f"name it {name}_mask.nii.gz (or {name}.nii.gz) in that folder")


def user_brain_mask(path: str | os.PathLike[str], volume: Volume) -> BrainMaskResult:
    """A mask the user supplied, checked to lie on the scan's grid and to be a plausible brain."""
    t0 = time.perf_counter()
    mask = load_mask(path, like=volume)
    check_plausible_brain(mask, volume, f"mask {path}")
    return BrainMaskResult(mask, "user", float(mask.sum()) * volume.voxel_volume_ml, time.perf_counter() - t0)


def brain_mask_for(volume: Volume, mode: str, *, head_ml: float, tolerance: float = 0.01, size: int = 192,
                   user_mask: str | os.PathLike[str] | None = None, contrast: str | None = None,
                   session_t1: str | os.PathLike[str] | None = None) -> tuple[BrainMaskResult | None, float | None]:
    """The brain-extraction stage: the user's mask, deepbet's mask, or None (the scan is taken as a
    brain already). A T2/FLAIR head with a T1 of the same session (``session_t1``) gets the T1's mask
    carried over rigidly, which measures better than deepbet on the scan itself; then deepbet on the scan,
    then a head template's mask, each taken only when it is a plausible brain; else the scan is refused
    with every reason. Also returns the probed foreground (mL) when it was measured."""
    if mode not in SKULL_STRIP_MODES:
        raise ValueError(f"skull_strip must be one of {', '.join(SKULL_STRIP_MODES)}, not {mode!r}")
    if user_mask is not None:
        return user_brain_mask(user_mask, volume), None
    if mode == "mask":
        raise VolumeError(volume.path, "skull_strip is 'mask' but no brain mask was given",
                          "pass --brain-mask FILE|FOLDER")
    if mode == "skip":
        return None, None
    fg = foreground_ml(volume, tolerance)
    if mode == "auto" and fg <= head_ml:
        return None, fg
    from anomaly.mask_transfer import mask_from_head_template, mask_from_t1

    tried: list[str] = []
    if contrast in ("t2", "flair") and session_t1 is not None:
        try:
            return mask_from_t1(volume, session_t1, size=size), fg
        except VolumeError as exc:
            tried.append(f"session T1: {exc.reason}")
    try:
        return strip_skull(volume, size=size), fg
    except VolumeError as exc:
        tried.append(exc.reason)
    try:
        return mask_from_head_template(volume), fg
    except VolumeError as exc:
        tried.append(exc.reason)
    except StageUnavailable as exc:
        tried.append(f"no head-template fallback ({str(exc).split(';')[0]})")
    raise VolumeError(volume.path, "; ".join(tried),
                      "name a T1 of the same session with --t1-for-mask FILE, give this scan's brain mask with "
                      "--brain-mask, or strip it with another tool and use --skull-strip skip")

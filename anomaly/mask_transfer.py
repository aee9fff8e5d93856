"""Brain masks for T2 and FLAIR scans carried over from a T1 of the same session.

deepbet was trained on T1w heads. When a T1 of the same subject and session is at hand, its brain is
extracted and the T1 is registered rigidly onto the T2/FLAIR (ANTsPy, mutual information, on 2 mm
copies of both heads), and the mask is carried onto the scan's own grid. The session's T1 is named
with ``--t1-for-mask`` or found beside the scan (BIDS ``anat`` folders, or files named like it with
``t1`` in place of ``t2``/``flair``).
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from anomaly.brain_extraction import BrainMaskResult, check_plausible_brain, strip_skull
from anomaly.volume import NIFTI_SUFFIXES, Volume, VolumeError, load_volume

RIGID_SPACING_MM = 2.0
_T1_SUFFIXES = ("T1w", "t1w", "T1", "t1", "mprage", "MPRAGE")
_OTHER = re.compile(r"(?i)(?<![a-z0-9])(t2w|t2|flair|t2_flair|t2flair)(?![a-z0-9])")


def find_session_t1(scan: str | os.PathLike[str]) -> Path | None:
    """A T1 of the same session beside ``scan``: in a BIDS ``anat`` folder the ``*_T1w`` file with the
    same entities (run, acq dropped when no exact match); elsewhere the file named like the scan with
    its ``t2``/``flair`` token replaced by ``t1``/``t1w``, or a lone ``t1.nii(.gz)`` in the same folder."""
    scan = Path(scan)
    name = scan.name
    for ext in NIFTI_SUFFIXES:
        if name.endswith(ext):
            stem = name[: -len(ext)]
            break
    else:
        return None
    folder = scan.parent
    candidates: list[str] = []
    bids = re.match(r"(sub-[^_]+(?:_ses-[^_]+)?)(.*)_(T2w|FLAIR|T2starw|PDw)$", stem)
    if bids:
        candidates += [f"{bids.group(1)}{bids.group(2)}_T1w", f"{bids.group(1)}_T1w"]
    elif _OTHER.search(stem):
        candidates += [_OTHER.sub(t1, stem, count=1) for t1 in ("t1", "T1", "t1w", "T1w")]
    candidates += [f"{t1}" for t1 in _T1_SUFFIXES]
    for cand in candidates:
        for ext in NIFTI_SUFFIXES:
            path = folder / f"{cand}{ext}"
            if path.is_file() and path != scan:
                return path
    if bids:
        pattern = f"{bids.group(1)}*_T1w"
        found = sorted(p for ext in NIFTI_SUFFIXES for p in folder.glob(pattern + ext))
        if found:
            return found[0]
    return None


def rigid_to(fixed: Volume, moving: Volume, spacing_mm: float = RIGID_SPACING_MM, seed: int = 1) -> list[str]:
    """ANTs transform files (in a temporary folder the caller removes) that bring ``moving`` onto
    ``fixed`` rigidly; mutual information copes with the different contrasts."""
    from anomaly.registration import _ants, _seeded, to_ants

    ants = _ants()
    work = (spacing_mm,) * 3
    fix = ants.resample_image(to_ants(fixed.data, fixed.affine), work, False, 0)
    mov = ants.resample_image(to_ants(moving.data, moving.affine), work, False, 0)
    with _seeded(ants, seed):
        result = ants.registration(fix, mov, type_of_transform="Rigid", aff_metric="mattes",
                                   outprefix=str(Path(tempfile.mkdtemp(prefix="anomaly-rigid-")) / "r_"),
                                   verbose=False)
    return list(result["fwdtransforms"])


def carry_mask(mask: np.ndarray, source: Volume, target: Volume, transforms: list[str]) -> np.ndarray:
    """A mask on ``source``'s grid resampled onto ``target``'s through the transforms (linear, > 0.5)."""
    from anomaly.registration import _ants, to_ants

    ants = _ants()
    out = ants.apply_transforms(to_ants(np.zeros(target.shape, np.float32), target.affine),
                                to_ants(mask.astype(np.float32), source.affine), transforms,
                                interpolator="linear")
    return np.asarray(out.numpy()) > 0.5


def mask_from_t1(volume: Volume, t1: Volume | str | os.PathLike[str], *, size: int = 192,
                 check: bool = True) -> BrainMaskResult:
    """The brain mask of a T2/FLAIR scan from a T1 of the same session: deepbet on the T1, then the
    T1 registered rigidly onto the scan and the mask carried onto the scan's grid."""
    import shutil

    t0 = time.perf_counter()
    t1_volume = t1 if isinstance(t1, Volume) else load_volume(t1)
    t1_mask = strip_skull(t1_volume, size=size).mask
    try:
        transforms = rigid_to(volume, t1_volume)
    except Exception as exc:  # noqa: BLE001 - ANTs reports failures as generic errors
        raise VolumeError(volume.path, f"rigid registration of the session's T1 {t1_volume.path} failed: {exc}",
                          "check that both files are heads of the same session, or give --brain-mask") from exc
    try:
        mask = carry_mask(t1_mask, t1_volume, volume, transforms)
    finally:
        shutil.rmtree(Path(transforms[0]).parent, ignore_errors=True)
    if check:
        check_plausible_brain(mask, volume, f"T1 mask from {Path(str(t1_volume.path)).name}")
    return BrainMaskResult(mask, "t1", float(mask.sum()) * volume.voxel_volume_ml, time.perf_counter() - t0)


def mask_from_template(volume: Volume, head: Volume, brain: np.ndarray, *, transform: str = "Affine",
                       check: bool = True) -> BrainMaskResult:
    """The brain mask of a head template (``head`` with its ``brain``) carried onto the scan through an
    affine registration of the template head to the scan (mutual information, 3 mm copies)."""
    import shutil

    from anomaly.registration import _ants, _seeded, to_ants

    t0 = time.perf_counter()
    ants = _ants()
    work = (3.0, 3.0, 3.0)
    fix = ants.resample_image(to_ants(volume.data, volume.affine), work, False, 0)
    mov = ants.resample_image(to_ants(head.data, head.affine), work, False, 0)
    folder = Path(tempfile.mkdtemp(prefix="anomaly-template-"))
    try:
        with _seeded(ants, 1):
            result = ants.registration(fix, mov, type_of_transform=transform, outprefix=str(folder / "t_"),
                                       verbose=False)
        mask = carry_mask(brain, head, volume, list(result["fwdtransforms"]))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if check:
        check_plausible_brain(mask, volume, "head template")
    return BrainMaskResult(mask, "template", float(mask.sum()) * volume.voxel_volume_ml, time.perf_counter() - t0)

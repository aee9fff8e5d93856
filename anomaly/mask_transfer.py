"""Brain masks carried over from another image: a T1 of the same session, or a head template.

deepbet was trained on T1w heads. When a T1 of the same subject and session is at hand, its brain is
extracted and the T1 is registered rigidly onto the T2/FLAIR (ANTsPy, mutual information, on 2 mm
copies of both heads), and the mask is carried onto the scan's own grid. The session's T1 is named
with ``--t1-for-mask`` or found beside the scan (BIDS ``anat`` folders, or files named like it with
``t1`` in place of ``t2``/``flair``). The last resort, when deepbet finds no plausible brain in the scan
itself, is an average head template (pydeface's, MIT) registered affinely onto the scan, its brain mask
(deepbet's on the template, made once and cached) carried along.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from anomaly.brain_extraction import BrainMaskResult, StageUnavailable, check_plausible_brain, strip_skull
from anomaly.volume import NIFTI_SUFFIXES, Volume, VolumeError, load_mask, load_volume, save_nifti

MIN_SCALE, MAX_SCALE = 0.8, 1.25
"""Scale factors of the template-to-scan affine beyond which the fit is no head's (measured: 0.91-1.05 on
good fits, 0.67 on a failed one, 1.58 on a noise-filled box)."""
HEAD_TEMPLATE_SHA256 = "fdc13571d66293f9919648cd8de9a7b3491b12175e09336353d2c9ce0466ecb6"
"""pydeface 2.1.0's ``data/mean_reg2mean.nii.gz``, the average head measured in the README."""

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
        fwd = list(result["fwdtransforms"])
        scales = np.linalg.svd(np.asarray(ants.read_transform(fwd[0]).parameters[:9]).reshape(3, 3), compute_uv=False)
        mask = carry_mask(brain, head, volume, fwd)
    except Exception as exc:  # noqa: BLE001 - ANTs reports failures as generic errors
        raise VolumeError(volume.path, f"registration of the head template failed: {exc}") from exc
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if not all(MIN_SCALE <= v <= MAX_SCALE for v in scales):
        raise VolumeError(volume.path, "brain extraction (head template) found no plausible brain: the template "
                          f"had to be scaled by {' x '.join(f'{v:.2f}' for v in scales)} to fit (expected "
                          f"{MIN_SCALE}-{MAX_SCALE}: heads differ less)")
    if check:
        check_plausible_brain(mask, volume, "head template")
    return BrainMaskResult(mask, "template", float(mask.sum()) * volume.voxel_volume_ml, time.perf_counter() - t0)


def head_template() -> tuple[Volume, np.ndarray]:
    """The average head template (pydeface 2.1.0, pinned by SHA-256) and its brain mask, which deepbet
    makes once and the user cache keeps (``ANOMALY_CACHE_DIR`` or ``~/.cache/anomaly``)."""
    import importlib.resources

    from anomaly.brain_net import cache_dir, sha256

    try:
        path = Path(str(importlib.resources.files("pydeface") / "data" / "mean_reg2mean.nii.gz"))
    except ImportError as exc:
        raise StageUnavailable("the head-template fallback needs the pydeface package's template; install it "
                               "with `pip install --no-deps pydeface==2.1.0` (as `make setup` does)") from exc
    if not path.is_file() or sha256(path) != HEAD_TEMPLATE_SHA256:
        raise StageUnavailable(f"head template {path} is missing or not pydeface 2.1.0's; reinstall it with "
                               "`pip install --no-deps pydeface==2.1.0`")
    head = load_volume(path)
    cached = cache_dir().parent / "head-template" / f"mean_reg2mean_brain_{HEAD_TEMPLATE_SHA256[:12]}.nii.gz"
    try:
        brain = load_mask(cached, like=head)
    except (OSError, VolumeError):
        brain = strip_skull(head).mask
        cached.parent.mkdir(parents=True, exist_ok=True)
        save_nifti(brain.astype(np.uint8), head.affine, cached, dtype=np.uint8)
    return head, brain


def mask_from_head_template(volume: Volume, check: bool = True) -> BrainMaskResult:
    """The fallback mask: the head template's brain carried onto the scan (see :func:`head_template`)."""
    head, brain = head_template()
    return mask_from_template(volume, head, brain, check=check)

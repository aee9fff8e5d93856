"""Raw heads: brain-extraction Dice, registration error and detection raw vs stripped, with seconds per stage.

1. Brain masks (deepbet, ``anomaly.brain_extraction.strip_skull``) against a reference on every head at
   hand: IXI heads (2 mm; reference: DLMUSE labels > 0, intracranial), Colin27 ``ch2`` (reference:
   ``ch2bet`` > 0; evaluation only), each as is, reoriented to LAS, and with anisotropic voxels; the
   healthy heads without a reference (volume and plausibility only); the MNI152 brain (the ``auto``
   decision must leave it alone). Also the bar: the mask ``anomaly score --skull-strip auto`` writes for
   ``ch2`` against the one ``--skull-strip skip`` writes for ``ch2bet``.
2. Registration to MNI152 (ANTsPy, affine and deformable): landmark error (mm) of the MNI152 brain and
   of Colin27's brain moved by known motions, and the overlap of the warped brain with the template's.
3. Detection on Colin27's head with synthetic lesions: scored raw (``--skull-strip skip``) and after
   stripping (``auto``), intensity baseline: voxel AUROC / AUPRC over the head and the scan score.
4. T2/FLAIR brain masks (``--only contrasts``) by deepbet on the scan, the session T1's mask carried over
   rigidly, and the head template's mask carried over affinely, and the one the stage picks: on the
   MS and BraTS sets (skull-stripped T1/T2/FLAIR; the T2/FLAIR moved by a rigid motion; reference: the
   set's brain), IXI T1 heads with their contrast inverted inside the head (a T2-like head with skull;
   reference: DLMUSE > 0), and the healthy T2/FLAIR heads (no reference and no T1: Dice against deepbet's
   own mask on the scan).

Not a test. Usage: python benchmarks/brain_extraction.py [DATA_DIR] [--ixi N] [--cases N] [--only PART ...]
[--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to

from anomaly.brain_extraction import brain_fill, check_plausible_brain, foreground_ml, strip_skull
from anomaly.config import PreprocessConfig, ScoringSettings
from anomaly.metrics import auprc, auroc
from anomaly.models import load_model
from anomaly.registration import mni152_template, mni152_template_path, register_to_mni
from anomaly.scoring import score_volume
from anomaly.synth import add_lesions
from anomaly.volume import Volume, VolumeError, load_mask, load_volume

COLIN = Path("/usr/share/mricron/templates")
REPO = Path(__file__).resolve().parents[1]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def regrid(volume: Volume, affine: np.ndarray, shape: tuple[int, ...], order: int = 1) -> Volume:
    """The volume resampled onto another grid (a new orientation and voxel size, same world box)."""
    img = nib.Nifti1Image(volume.data, volume.affine)
    out = resample_from_to(img, (shape, affine), order=order)
    return Volume(np.asarray(out.dataobj, dtype=np.float32), affine, path=volume.path)


def variant_grid(volume: Volume, kind: str) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Grid of a variant: ``las12`` (LAS, 1.2 mm), ``aniso`` (LAS, 1 x 1 x 3 mm; 2 x 2 x 4 mm for 2 mm heads)."""
    spacing = {"las12": (1.2, 1.2, 1.2), "aniso": (1.0, 1.0, 3.0)}[kind]
    if min(volume.spacing) > 1.5 and kind == "aniso":
        spacing = (2.0, 2.0, 4.0)
    corners = np.array([[i, j, k] for i in (0, volume.shape[0] - 1) for j in (0, volume.shape[1] - 1)
                        for k in (0, volume.shape[2] - 1)], float)
    world = nib.affines.apply_affine(volume.affine, corners)
    lo, hi = world.min(axis=0), world.max(axis=0)
    shape = tuple(int(np.ceil((h - lo_) / s)) + 1 for lo_, h, s in zip(lo, hi, spacing, strict=True))
    affine = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [hi[0], lo[1], lo[2]]
    return affine, shape  # type: ignore[return-value]


def variants(volume: Volume, reference: np.ndarray | None) -> list[tuple[str, Volume, np.ndarray | None]]:
    out = [("as is", volume, reference)]
    for kind in ("las12", "aniso"):
        affine, shape = variant_grid(volume, kind)
        moved = regrid(volume, affine, shape)
        ref = None
        if reference is not None:
            ref = regrid(Volume(reference.astype(np.float32), volume.affine), affine, shape, order=0).data > 0.5
        out.append(({"las12": "LAS 1.2 mm", "aniso": "LAS anisotropic"}[kind], moved, ref))
    return out


def extraction(root: Path, n_ixi: int) -> list[dict]:
    rows = []
    heads: list[tuple[str, Volume, np.ndarray | None]] = []
    if (COLIN / "ch2.nii.gz").exists():
        heads.append(("Colin27 ch2 (ref ch2bet>0)", load_volume(COLIN / "ch2.nii.gz"),
                      load_volume(COLIN / "ch2bet.nii.gz").data > 0))
    for folder in sorted((root / "ixi-t1").glob("IXI*"))[:n_ixi]:
        head = load_volume(folder / "t1_head.nii.gz")
        heads.append((f"IXI {folder.name} (ref DLMUSE>0)", head, load_mask(folder / "dlmuse_labels.nii.gz", like=head)))
    for path in sorted((root / "healthy").glob("*.nii.gz")):
        heads.append((f"healthy {path.name} (no reference)", load_volume(path), None))
    for name, volume, reference in heads:
        for variant, vol, ref in variants(volume, reference):
            fg = foreground_ml(vol)
            result = strip_skull(vol, check=False)
            try:
                check_plausible_brain(result.mask, vol, "deepbet")
                plausible = "yes"
            except VolumeError:
                plausible = "no"
            row = {"head": name, "variant": variant, "shape": list(vol.shape),
                   "spacing": [round(s, 2) for s in vol.spacing], "foreground_ml": round(fg),
                   "auto_strips": fg > PreprocessConfig().skull_volume_ml, "mask_ml": round(result.volume_ml),
                   "plausible": plausible, "seconds": round(result.seconds, 1),
                   "dice": round(dice(result.mask, ref), 4) if ref is not None else None}
            rows.append(row)
            print(row, flush=True)
    template = Volume(mni152_template().data, mni152_template().affine, path=mni152_template_path())
    fg = foreground_ml(template)
    forced = strip_skull(template, check=False)
    row = {"head": "MNI152 2009c brain (nilearn; no head is shipped)", "variant": "as is",
           "foreground_ml": round(fg), "auto_strips": fg > PreprocessConfig().skull_volume_ml,
           "mask_ml": round(forced.volume_ml), "seconds": round(forced.seconds, 1),
           "dice": round(dice(forced.mask, mni152_template().mask), 4), "plausible": "forced"}
    rows.append(row)
    print(row, flush=True)
    return rows


def _moved(volume: Volume, motion: np.ndarray, order: int = 1) -> Volume:
    """The subject moved by ``motion`` (world mm) inside the same scanner grid: content resampled, affine kept."""
    img = nib.Nifti1Image(volume.data, volume.affine)
    out = resample_from_to(img, (volume.shape, motion @ volume.affine), order=order)
    return Volume(np.asarray(out.dataobj, dtype=np.float32), volume.affine, path=volume.path)


def contrast_cases(root: Path, n: int) -> list[dict]:
    """T2/FLAIR cases: (name, contrast, scan, session T1 or None, reference mask or None, what the reference is)."""
    motion = _motion((7, -5, 4), (4, -6, 5))
    cases = []
    for folder in sorted((root / "ms-open").glob("patient*"))[:n] + sorted((root / "brats2018").glob("Brats*"))[:n]:
        t1 = load_volume(folder / "t1.nii.gz")
        reference = _moved(Volume((t1.data > 0).astype(np.float32), t1.affine), motion, order=0).data > 0.5
        for contrast in ("t2", "flair"):
            scan = _moved(load_volume(folder / f"{contrast}.nii.gz"), motion)
            cases.append({"case": f"{folder.parent.name}/{folder.name} (stripped, moved)", "contrast": contrast,
                          "scan": scan, "t1": t1, "reference": reference, "ref": "the set's brain (T1 > 0), moved"})
    for folder in sorted((root / "ixi-t1").glob("IXI*"))[:n]:
        head = load_volume(folder / "t1_head.nii.gz")
        labels = load_mask(folder / "dlmuse_labels.nii.gz", like=head)
        inside = head.data > np.percentile(head.data, 60) * 0.1
        t2like = Volume(np.where(inside, head.data.max() - head.data, 0).astype(np.float32), head.affine)
        cases.append({"case": f"IXI {folder.name} T1 head, contrast inverted, moved", "contrast": "t2-like",
                      "scan": _moved(t2like, motion), "t1": head,
                      "reference": _moved(Volume(labels.astype(np.float32), head.affine), motion, order=0).data > 0.5,
                      "ref": "DLMUSE > 0, moved"})
    for name, contrast in (("niivue_t2w_head.nii.gz", "t2"), ("niivue_flair.nii.gz", "flair")):
        if (root / "healthy" / name).exists():
            cases.append({"case": f"healthy {name}", "contrast": contrast, "scan": load_volume(root / "healthy" / name),
                          "t1": None, "reference": None, "ref": "none (deepbet on the scan itself)"})
    return cases


def contrasts(root: Path, n: int) -> list[dict]:
    """Brain masks of T2/FLAIR scans by (a) deepbet on the scan, (b) the session T1's mask carried over
    rigidly, (c) the head template's brain mask carried over affinely; and the one the stage picks
    (b, else a, else c, the first that is a plausible brain; else the scan is refused)."""
    from anomaly.mask_transfer import head_template, mask_from_head_template, mask_from_t1

    head_template()  # the template's brain mask is made once, outside the timings
    rows = []
    for case in contrast_cases(root, n):
        scan, reference = case["scan"], case["reference"]
        found: dict[str, np.ndarray] = {}
        methods = {"a_deepbet": lambda s=scan: strip_skull(s, check=False)}
        if case["t1"] is not None:
            methods["b_t1"] = lambda s=scan, t=case["t1"]: mask_from_t1(s, t, check=False)
        methods["c_template"] = lambda s=scan: mask_from_head_template(s, check=False)
        plausible: dict[str, bool] = {}
        for method, run in methods.items():
            t0 = time.perf_counter()
            result = None
            try:
                result = run()
                check_plausible_brain(result.mask, scan, method)
                plausible[method] = True
            except VolumeError as exc:
                plausible[method] = False
                if result is None:  # no mask at all (e.g. the template fit was refused)
                    row = {"case": case["case"], "contrast": case["contrast"], "method": method,
                           "reference": case["ref"], "mask_ml": None, "plausible": False, "dice": None,
                           "seconds": round(time.perf_counter() - t0, 1), "note": exc.reason[-80:]}
                    rows.append(row)
                    print(row, flush=True)
                    continue
            assert result is not None
            found[method] = result.mask
            ref = reference if reference is not None else found.get("a_deepbet")
            row = {"case": case["case"], "contrast": case["contrast"], "method": method,
                   "reference": case["ref"], "mask_ml": round(result.volume_ml), "plausible": plausible[method],
                   "fill": round(brain_fill(result.mask, scan.affine), 3),
                   "dice": round(dice(result.mask, ref), 4) if ref is not None else None,
                   "seconds": round(result.seconds, 1)}
            rows.append(row)
            print(row, flush=True)
        chosen = next((m for m in ("b_t1", "a_deepbet", "c_template") if plausible.get(m)), "refused")
        row = {"case": case["case"], "contrast": case["contrast"], "method": "picked", "picked": chosen,
               "dice": (round(dice(found[chosen], reference), 4) if chosen in found and reference is not None
                        else None)}
        rows.append(row)
        print(row, flush=True)
    return rows

def bar(model_name: str = "intensity") -> list[dict]:
    """What ``anomaly score`` writes as <name>_brain for ch2 (auto) and ch2bet (skip), as is and LAS 1.2 mm."""
    if not (COLIN / "ch2.nii.gz").exists():
        return []
    model = load_model(model_name)
    head, brain = load_volume(COLIN / "ch2.nii.gz"), load_volume(COLIN / "ch2bet.nii.gz")
    rows = []
    for variant in ("as is", "las12"):
        h, b = head, brain
        if variant != "as is":
            affine, shape = variant_grid(head, variant)
            h, b = regrid(head, affine, shape), regrid(brain, affine, shape)
        t0 = time.perf_counter()
        auto = score_volume(h, model, ScoringSettings())
        t1 = time.perf_counter()
        skip = score_volume(b, model, ScoringSettings(preprocess=PreprocessConfig(skull_strip="skip")))
        t2 = time.perf_counter()
        row = {"variant": variant, "dice_written_masks": round(dice(auto.brain_mask, skip.brain_mask), 4),
               "head_warning": any("head with skull" in w for w in auto.warnings),
               "map_on_input_grid": auto.anomaly.shape == h.shape, "seconds_auto": round(t1 - t0, 1),
               "seconds_skip": round(t2 - t1, 1), "skull_strip_s": auto.prepared.stages.get("skull_strip_s")}
        rows.append(row)
        print(row, flush=True)
    return rows


def _motion(deg: tuple[float, float, float], shift: tuple[float, float, float], scale: float = 1.0) -> np.ndarray:
    out = np.eye(4)
    for axis, angle in enumerate(np.radians(deg)):
        c, s = np.cos(angle), np.sin(angle)
        r = np.eye(3)
        i, j = [k for k in range(3) if k != axis]
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out[:3, :3] = r @ out[:3, :3]
    out[:3, :3] *= scale
    out[:3, 3] = shift
    return out


LANDMARKS_MNI = np.array([[0, 0, 0], [0, -18, 8], [-40, -20, 50], [40, -20, 50], [0, 50, 10], [0, -90, 5],
                          [-60, -20, 0], [60, -20, 0], [0, -40, -40], [0, 0, 65]], float)


def registration() -> list[dict]:
    rows = []
    sources = [("MNI152 brain", Volume(mni152_template().data, mni152_template().affine))]
    if (COLIN / "ch2bet.nii.gz").exists():
        sources.append(("Colin27 brain", load_volume(COLIN / "ch2bet.nii.gz")))
    motions = {"rigid 12/-8/5 deg, 16 mm": _motion((12, -8, 5), (6, -9, 12)),
               "rigid + 8% larger": _motion((-10, 6, 0), (-5, 7, -10), 1.08)}
    for name, volume in sources:
        for label, motion in motions.items():
            moved = Volume(volume.data, motion @ volume.affine)
            for kind in ("affine", "deformable"):
                reg = register_to_mni(moved, moved.data > 0, transform=kind)
                found = reg.native_to_template_points(nib.affines.apply_affine(motion, LANDMARKS_MNI))
                err = np.linalg.norm(found - LANDMARKS_MNI, axis=1)
                back = reg.template_to_native_points(reg.native_to_template_points(LANDMARKS_MNI))
                row = {"brain": name, "motion": label, "transform": kind, "seconds": round(reg.seconds, 1),
                       "template_dice": round(reg.overlap or 0.0, 4),
                       "landmark_mean_mm": round(float(err.mean()), 2), "landmark_max_mm": round(float(err.max()), 2),
                       "inverse_roundtrip_mm": float(f"{np.abs(back - LANDMARKS_MNI).max():.2g}")}
                rows.append(row)
                print(row, flush=True)
    return rows


def detection(model_name: str = "intensity") -> list[dict]:
    """ch2 head with lesions inside ch2bet's brain: scored raw (skip) and stripped (auto)."""
    if not (COLIN / "ch2.nii.gz").exists():
        return []
    head, brain = load_volume(COLIN / "ch2.nii.gz"), load_volume(COLIN / "ch2bet.nii.gz").data > 0
    data, truth = add_lesions(head.data, brain, head.spacing, kinds=("hyperintense", "hypointense", "mass"),
                              n=4, seed=3)
    lesioned = replace(head, data=data, path=Path("ch2_T1w_lesions.nii.gz"))
    model = load_model(model_name)
    rows = []
    for mode in ("skip", "auto"):
        settings = ScoringSettings(preprocess=PreprocessConfig(skull_strip=mode), save_reconstruction=False)
        t0 = time.perf_counter()
        maps = score_volume(lesioned, model, settings)
        seconds = time.perf_counter() - t0
        head_voxels = head.data > np.percentile(head.data, 5)
        values, labels = maps.anomaly[head_voxels], truth[head_voxels]
        top = np.argsort(maps.anomaly.ravel())[::-1][:int(truth.sum())]
        row = {"scored": "raw head (--skull-strip skip)" if mode == "skip" else "stripped (--skull-strip auto)",
               "voxel_auroc": round(auroc(values, labels), 4), "voxel_auprc": round(auprc(values, labels), 4),
               "top_voxels_in_lesions": round(float(truth.ravel()[top].mean()), 3),
               "scan_score": round(maps.score, 4), "seconds": round(seconds, 1)}
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--ixi", type=int, default=5, help="IXI heads to use (default 5)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--only", choices=("extraction", "bar", "registration", "detection", "contrasts"), nargs="*")
    parser.add_argument("--cases", type=int, default=3, help="sets per source for the T2/FLAIR part (default 3)")
    args = parser.parse_args()
    parts = args.only or ["extraction", "bar", "registration", "detection"]
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}")
    results: dict[str, list[dict]] = {}
    for part in parts:
        print(f"== {part}")
        if part == "extraction":
            results[part] = extraction(Path(args.data), args.ixi)
        elif part == "bar":
            results[part] = bar()
        elif part == "registration":
            results[part] = registration()
        elif part == "contrasts":
            results[part] = contrasts(Path(args.data), args.cases)
        else:
            results[part] = detection()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

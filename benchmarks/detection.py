"""Detection quality on the held-out evaluation cases: the default model against the intensity baseline.

Real lesions (MS and gliomas on T1, T2 and FLAIR) and Colin27 (T1) with synthetic lesions, all kinds
and the in-range kinds only. Each scan is scored as the contrast its file name states (Colin27's
``ch2bet`` is T1), as ``anomaly score`` does by default. Prints voxel AUROC, voxel AUPRC, best Dice (an oracle: the threshold is
chosen on the same voxels) and scan AUROC where normal scans exist, per dataset and contrast, with
seconds per brain. Not a test. Usage: python benchmarks/detection.py [--models default intensity] [DATA_DIR]
``--folds K`` then reports the same figures over K leave-patients-out folds of the shared lesion patients
(``benchmarks/folds.py``: the shipped recipe retrained without each fold's patients for ``--fold-steps``
steps, measured on them beside thresholding, with the mean and [min, max] over folds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from anomaly.config import PostprocessConfig, ScoringSettings
from anomaly.contrast import SCAN_CONTRASTS, contrast_label
from anomaly.median import parse_median_sizes
from anomaly.metrics import auprc, auroc, best_dice, scan_auroc
from anomaly.models import AutoencoderSliceModel, load_model
from anomaly.models.base import SliceModel
from anomaly.models.folder import ModelLoadError
from anomaly.models.routing import ContrastRoutedModel
from anomaly.scoring import score_volume
from anomaly.synth import IN_RANGE_KINDS, KINDS, add_lesions
from anomaly.volume import Volume, load_mask, load_volume

COLIN = Path("/usr/share/mricron/templates/ch2bet.nii.gz")


@dataclass
class Case:
    """One evaluation scan: its group (dataset / contrast), the volume and its ground truth (None = normal)."""

    group: str
    name: str
    volume: Volume
    truth: np.ndarray | None


def real_cases(root: Path) -> list[Case]:
    spec = [("ms-open", "patient26", ("t1", "t2", "flair"), "lesion_mask"),
            ("brats2013", "pat0001", ("flair", "t1c"), "tumor_labels"),
            ("brats2013", "pat0002", ("flair", "t1c"), "tumor_labels"),
            ("brats2018", "Brats18_TCIA10_639_1", ("t1", "t2", "flair"), "tumor_labels")]
    cases = []
    for dataset, case, contrasts, label in spec:
        folder = root / dataset / case
        if not folder.is_dir():
            print(f"skipped {folder}: not found")
            continue
        truth = load_mask(folder / f"{label}.nii.gz")
        for contrast in contrasts:
            cases.append(Case(f"{dataset} {contrast_label(contrast)}", f"{case}/{contrast}",
                              load_volume(folder / f"{contrast}.nii.gz"), truth))
    return cases


def colin_cases(seeds: tuple[int, ...] = (1, 2, 3)) -> list[Case]:
    """Colin27 T1 with synthetic lesions (all kinds; in-range kinds only), and Colin27 itself plus its
    left-right mirror as the normal scans for scan AUROC."""
    if not COLIN.is_file():
        print(f"skipped Colin27: {COLIN} not found (Debian package mricron-data)")
        return []
    colin = load_volume(COLIN)
    brain = colin.data > 0
    cases = [Case("colin27 normal", "colin27", colin, None),
             Case("colin27 normal", "colin27-mirror", Volume(colin.data[::-1].copy(), colin.affine, COLIN), None)]
    for label, kinds in (("all kinds", KINDS), ("in-range", tuple(sorted(IN_RANGE_KINDS)))):
        for seed in seeds:
            data, truth = add_lesions(colin.data, brain, colin.spacing, kinds=kinds, n=4, seed=seed,
                                      radius_mm=(5.0, 12.0))
            cases.append(Case(f"colin27 T1 synthetic {label}", f"colin27-{label}-{seed}",
                              Volume(data.astype(np.float32), colin.affine, COLIN), truth))
    return cases


def build_model(spec: str, precision: str) -> SliceModel:
    """``NAME``, or ``NAME+Wx``: the model with its map's intensity term set to W in every contrast
    (``default+0x`` is the learned map alone, its residual at full weight)."""
    if "+" in spec and spec.endswith("x"):
        name, weight = spec.split("+", 1)
        model = load_model(name, precision=precision)
        parts = [model.base, *model.routes.values()] if isinstance(model, ContrastRoutedModel) else [model]
        if not all(isinstance(part, AutoencoderSliceModel) for part in parts):
            raise ModelLoadError(f"{name}: only autoencoder models carry an intensity term")
        w = float(weight[:-1])
        for part in parts:  # a model routed by contrast: its base and every route
            config = part.map_config
            part.map_config = replace(
                config, intensity_weight=w, intensity_weight_by_contrast={k: w for k in config.intensity_weight_by_contrast},
                # the learned map alone keeps its residual at full weight in every contrast
                residual_weight_by_contrast={} if w == 0 else config.residual_weight_by_contrast,
                residual_weight=1.0 if w == 0 else config.residual_weight)
        model.name = spec
        return model
    return load_model(spec, precision=precision)


def contrast_of(group: str) -> str:
    return group.split()[-1] if not group.startswith("colin27") else "T1"


def evaluate(model_name: str, cases: list[Case], settings: ScoringSettings) -> dict[str, dict[str, float]]:
    """Per group (dataset / contrast) and per contrast over every real case ("all ... "): pooled voxel
    AUROC, AUPRC and best Dice (one threshold for all scans of the group), the per-scan AUPRC and best
    Dice (mean, min, max: the spread over patients), scan AUROC where normal scans exist, s/brain."""
    try:
        model = build_model(model_name, settings.precision)
    except ModelLoadError as exc:
        print(f"skipped model {model_name}: {exc}")
        return {}
    voxels: dict[str, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
    seconds: dict[str, list[float]] = defaultdict(list)
    scan_scores: dict[str, list[tuple[float, bool]]] = defaultdict(list)
    for case in cases:
        t0 = time.perf_counter()
        maps = score_volume(case.volume, model, settings)
        elapsed = time.perf_counter() - t0
        groups = [case.group]
        if case.truth is not None and not case.group.startswith("colin27"):
            groups.append(f"all real lesions {contrast_of(case.group)}")
        for group in groups:
            seconds[group].append(elapsed)
        if case.truth is None:
            for group in {c.group for c in cases if c.group.startswith("colin27 T1")}:
                scan_scores[group].append((maps.score, False))
            continue
        inside = maps.brain_mask
        for group in groups:
            voxels[group].append((maps.anomaly[inside], case.truth[inside]))
        if case.group.startswith("colin27"):
            scan_scores[case.group].append((maps.score, True))
        print(f"  {model_name}: {case.name} scored in {elapsed:.1f} s", flush=True)
    table: dict[str, dict[str, float]] = {}
    for group, pairs in voxels.items():
        v = np.concatenate([p[0] for p in pairs])
        y = np.concatenate([p[1] for p in pairs])
        per_scan = [(auprc(a, b), best_dice(a, b)[0]) for a, b in pairs if b.any()]
        row = {"auroc": auroc(v, y), "auprc": auprc(v, y), "dice*": best_dice(v, y)[0],
               "scan_auprc_mean": float(np.mean([p[0] for p in per_scan])),
               "scan_auprc_min": float(np.min([p[0] for p in per_scan])),
               "scan_auprc_max": float(np.max([p[0] for p in per_scan])),
               "scan_dice_mean": float(np.mean([p[1] for p in per_scan])),
               "prevalence": float(y.mean()), "s/brain": float(np.mean(seconds[group])), "n": len(pairs)}
        pairs_s = scan_scores.get(group, [])
        row["scan_auroc"] = (scan_auroc([p[0] for p in pairs_s], [p[1] for p in pairs_s])
                             if pairs_s and len({p[1] for p in pairs_s}) == 2 else float("nan"))
        table[group] = row
    return table


def print_table(results: dict[str, dict[str, dict[str, float]]]) -> None:
    print("| dataset / contrast | model | voxel AUROC | voxel AUPRC pooled | best Dice pooled (oracle) | "
          "AUPRC per scan: mean [min, max] | best Dice per scan: mean | scan AUROC | s/brain |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    groups = sorted({g for table in results.values() for g in table}, key=lambda g: (g.startswith("all"), g))
    for group in groups:
        for model, table in results.items():
            if group not in table:
                continue
            r = table[group]
            scan = "n/a" if np.isnan(r["scan_auroc"]) else f"{r['scan_auroc']:.3f}"
            print(f"| {group} (n={r['n']}) | {model} | {r['auroc']:.3f} | {r['auprc']:.3f} | {r['dice*']:.3f} | "
                  f"{r['scan_auprc_mean']:.3f} [{r['scan_auprc_min']:.3f}, {r['scan_auprc_max']:.3f}] | "
                  f"{r['scan_dice_mean']:.3f} | {scan} | {r['s/brain']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    parser.add_argument("--models", nargs="+", default=["default", "default+0x", "intensity", "medical-vae", "sd-vae-ft-mse"],
                        help="registry names or folders; NAME+Wx sets the intensity term of NAME's map to W")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--erode-mm", type=float, default=None,
                        help="brain-mask erosion of the map in mm (default: the scoring default)")
    parser.add_argument("--median-size", type=parse_median_sizes, default=None,
                        help="in-plane median filter of the map in pixels, or several sizes whose medians are "
                             "averaged (1,7,13) (default: each model's own)")
    parser.add_argument("--no-colin", action="store_true")
    parser.add_argument("--no-real", action="store_true", help="only Colin27 with synthetic lesions")
    parser.add_argument("--json", default=None, help="also write the figures as JSON here")
    parser.add_argument("--folds", type=int, default=0,
                        help="then also K leave-patients-out folds of the shared patients (benchmarks/folds.py)")
    parser.add_argument("--fold-steps", type=int, default=600, help="training steps per fold (default 600)")
    parser.add_argument("--fold-out", default="runs/folds", help="where the folds keep their models and figures")
    parser.add_argument("--contrasts", nargs="+", default=list(SCAN_CONTRASTS), choices=SCAN_CONTRASTS,
                        help="only the real cases of these contrasts (Colin27 is T1; t1c: contrast-enhanced T1)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    cases = [] if args.no_real else [c for c in real_cases(Path(args.data))
                                     if contrast_of(c.group).lower() in args.contrasts]
    cases += [] if args.no_colin or "t1" not in args.contrasts else colin_cases()
    post = PostprocessConfig(median_size=args.median_size)
    if args.erode_mm is not None:
        post = replace(post, erode_mm=args.erode_mm)
    settings = ScoringSettings(precision=args.precision, postprocess=post)
    print(f"# detection benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.precision}")
    results = {}
    for name in args.models:
        table = evaluate(name, cases, settings)
        if table:
            results[name] = table
    print_table(results)
    print("pooled: one threshold for every scan of a row (what a calibration lives on); per scan: each scan "
          "alone, mean and [min, max] over scans; best Dice is an oracle (threshold chosen on the same voxels); "
          "scan AUROC: Colin27 with lesions against Colin27 and its mirror image (n/a where a group has no normal scans)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.folds:
        print(f"\n# leave-patients-out folds ({args.folds}), each trained for {args.fold_steps} steps", flush=True)
        subprocess.run([sys.executable, str(Path(__file__).with_name("folds.py")), "--folds", str(args.folds),
                        "--steps", str(args.fold_steps), "--out", args.fold_out, "--data", args.data], check=True)


if __name__ == "__main__":
    main()

"""Leave-patients-out folds: the restoration stage of a recipe retrained without some shared patients and
measured on their lesions, beside intensity thresholding, so a decision never rests on one patient.

The lesion patients of the shared data outside the evaluation cases are split into K folds. For each
fold the denoiser is trained on the recipe's healthy slices minus every slice of the fold's patients
(MNI152, IXI and the other patients stay), at a fixed step budget, and kept with the recipe's VAE and
map rule; then the fold's patients are scored as ``benchmarks/detection.py`` does. Prints each fold's
figures per contrast and, per contrast, the mean and [min, max] over folds. Not a test. Usage:
python benchmarks/folds.py [--recipes configs/train/default.yaml OTHER.yaml] [--folds 3] [--steps 600]
(several recipes are compared at the same budget on the same folds; they must share their data list).
``--per-contrast`` adds, per recipe, one model per contrast (T1, T2, FLAIR) at the same total budget: each
trained for a third of the steps on its own contrast's slices alone, scoring only that contrast's scans
(figures of the recipes and thresholding already saved for a fold are reused).
``--resolutions 1.5:128 1.0:192`` trains and scores each recipe at every listed input grid (spacing in mm,
slice size in pixels) at the same step budget; what is set in pixels (crop size, blob radii, the map's median
filter) is rescaled so that it covers the same millimetres as at the recipe's own grid.
``--blob-from N`` starts the synthetic lesion blobs at step N of every fold (short budgets never reach the
recipe's own ``blob_from_step``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detection import Case, contrast_of, evaluate  # noqa: E402

from anomaly.config import ScoringSettings  # noqa: E402
from anomaly.median import median_setting, median_sizes  # noqa: E402
from anomaly.models import save_model_folder  # noqa: E402
from anomaly.training.config import load_recipe  # noqa: E402
from anomaly.training.data import SliceSet, matches_exclusion  # noqa: E402
from anomaly.training.denoiser import train_denoiser  # noqa: E402
from anomaly.volume import load_mask, load_volume  # noqa: E402
from pipelines.train import THROUGH_PLANE_MM, gather_slices, input_spec, median_size, nearest_odd  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LABELS = {"ms-open": "lesion_mask", "brats2013": "tumor_labels", "brats2018": "tumor_labels"}


def lesion_patients(root: Path, held_out: list[str]) -> list[str]:
    """``dataset/case`` of every shared lesion patient that is not an evaluation case, sorted."""
    found = []
    for dataset, label in LABELS.items():
        for folder in sorted((root / dataset).glob("*")):
            name = f"{dataset}/{folder.name}"
            if (folder / f"{label}.nii.gz").is_file() and matches_exclusion(name, held_out) is None:
                found.append(name)
    return found


def patient_cases(root: Path, patients: list[str]) -> list[Case]:
    """The T1, T2 and FLAIR scans of ``patients`` with their lesion masks, grouped by dataset and contrast."""
    cases = []
    for patient in patients:
        dataset = patient.split("/")[0]
        truth = load_mask(root / patient / f"{LABELS[dataset]}.nii.gz")
        for contrast in ("t1", "t2", "flair"):
            path = root / patient / f"{contrast}.nii.gz"
            if path.is_file():
                cases.append(Case(f"{dataset} {contrast.upper()}", f"{patient}/{contrast}", load_volume(path), truth))
    return cases


def without(slices: SliceSet, patients: list[str]) -> SliceSet:
    """The slices whose volume belongs to none of ``patients``."""
    return slices.subset([i for i, case in enumerate(slices.cases) if matches_exclusion(case, patients) is None])


def of_contrast(slices: SliceSet, contrast: str) -> SliceSet:
    """The slices of one contrast."""
    return slices.subset([i for i, c in enumerate(slices.contrasts) if c == contrast])


def per_contrast(recipe, slices: SliceSet, patients: list[str], steps: int, out: Path,  # noqa: ANN001
                 cases: list[Case], settings: ScoringSettings) -> dict[str, dict[str, float]]:
    """One model per contrast, trained on that contrast alone, each scoring its own contrast's scans."""
    table: dict[str, dict[str, float]] = {}
    for contrast in ("t1", "t2", "flair"):
        folder = train_fold(recipe, of_contrast(slices, contrast), patients, steps, out / contrast)
        table |= evaluate(str(folder), [c for c in cases if contrast_of(c.group) == contrast.upper()], settings)
    return table


def at_resolution(recipe, settings: ScoringSettings, grid: str):  # noqa: ANN001, ANN201
    """The recipe and scoring settings on another input grid ``SPACING:SIZE`` (mm, px): pixel-sized settings
    (crop size, blob radii, median filter) are rescaled to cover the same millimetres."""
    spacing, size = grid.split(":")
    mm, px = float(spacing), int(size)
    ratio = float(recipe.data.spacing[0]) / mm  # pixels at the new grid per pixel at the recipe's own
    data = replace(recipe.data, spacing=(mm, mm, mm), slice_size=px)
    low, high = recipe.denoiser.blob_radius_px
    denoiser = replace(recipe.denoiser, crop_size=int(round(recipe.denoiser.crop_size * ratio / 8)) * 8,
                       blob_radius_px=(float(low) * ratio, float(high) * ratio))
    if settings.postprocess.median_size is not None:  # else each fold's model folder carries its own
        own = settings.postprocess.median_size
        scaled = tuple(dict.fromkeys(nearest_odd(size * ratio) for size in median_sizes(own)))  # nearest odd sizes
        median = median_setting(scaled[0] if isinstance(own, int) else scaled)
        settings = replace(settings, postprocess=replace(settings.postprocess, median_size=median))
    return replace(recipe, data=data, denoiser=denoiser), settings


def train_fold(recipe, slices: SliceSet, patients: list[str], steps: int, out: Path,  # noqa: ANN001
               blob_from: int | None = None) -> Path:
    """The recipe's denoiser trained for ``steps`` without ``patients``; its model folder."""
    folder = out / "model"
    if (folder / "anomaly_model.json").is_file():
        return folder
    config = replace(recipe.denoiser, max_steps=steps, crop_until_step=int(steps * 2 / 3), val_every=steps,
                     max_minutes=0)
    if blob_from is not None:
        config = replace(config, blob_from_step=blob_from)
    result = train_denoiser(without(slices, patients), None, config, out, slice_size=recipe.data.slice_size,
                            augment=recipe.vae.augment, seed=recipe.seed, progress=False)
    vae = AutoencoderKL.from_pretrained(recipe.vae_from, local_files_only=True)
    save_model_folder(folder, vae.half(), name=f"fold-{out.name}", input_spec=input_spec(recipe),
                      restoration=result.model.half(), map_config=recipe.map,
                      extra={"left_out_patients": patients, "steps": result.step},
                      median_size=median_size(input_spec(recipe)), through_plane_mm=THROUGH_PLANE_MM)
    return folder


def summarise(per_fold: list[dict[str, dict[str, dict[str, float]]]]) -> None:
    """Per contrast and model: pooled AUPRC and best Dice of each fold, their mean and [min, max]."""
    print("\n## Over folds (pooled within each fold; mean [min, max] over folds)")
    print("| contrast | model | voxel AUPRC pooled | best Dice pooled | AUPRC per scan, mean over all scans | folds |")
    print("| --- | --- | --- | --- | --- | --- |")
    groups = sorted({g for fold in per_fold for table in fold.values() for g in table if g.startswith("all")})
    for group in groups:
        for model in dict.fromkeys(m for fold in per_fold for m in fold):
            rows = [fold[model][group] for fold in per_fold if group in fold.get(model, {})]
            if not rows:
                continue
            ap, dice = [r["auprc"] for r in rows], [r["dice*"] for r in rows]
            scans = np.average([r["scan_auprc_mean"] for r in rows], weights=[r["n"] for r in rows])
            print(f"| {group.removeprefix('all real lesions ')} | {model} | {np.mean(ap):.3f} [{min(ap):.3f}, "
                  f"{max(ap):.3f}] | {np.mean(dice):.3f} [{min(dice):.3f}, {max(dice):.3f}] | {scans:.3f} | "
                  f"{len(rows)} |")


def all_slices(recipe, work: Path) -> SliceSet:  # noqa: ANN001
    """Every healthy slice of the recipe (training and validation together), cached in ``work``."""
    train, val = gather_slices(recipe, work, progress=False)
    if val is None:
        return train
    return SliceSet(torch.cat([train.images, val.images]), torch.cat([train.masks, val.masks]),
                    train.cases + val.cases, train.contrasts + val.contrasts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["configs/train/default.yaml"])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=600, help="training steps per fold (two thirds on crops)")
    parser.add_argument("--slices", default=None, help="a run folder holding the recipes' slices.pt cache")
    parser.add_argument("--out", default="runs/folds")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", type=int, nargs="*", default=None,
                        help="run only these folds (1-based; e.g. one per process), then summarise every fold on disk")
    parser.add_argument("--per-contrast", action="store_true",
                        help="also one model per contrast per recipe, each trained for a third of --steps on its "
                             "contrast alone (the same total budget)")
    parser.add_argument("--resolutions", nargs="+", default=None, metavar="MM:PX",
                        help="input grids to compare at the same budget, e.g. 1.5:128 1.0:192 (default: the recipe's)")
    parser.add_argument("--blob-from", type=int, default=None,
                        help="start the synthetic lesion blobs at this step of each fold (default: the recipe's step)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    recipes = {Path(path).stem: load_recipe(path) for path in args.recipes}
    first = next(iter(recipes.values()))
    for name, recipe in recipes.items():
        if recipe.stage != "denoiser" or recipe.data != first.data:
            raise SystemExit(f"{name}: folds retrain the denoiser stage of recipes that share one data list")
    settings = ScoringSettings()
    arms: dict[str, tuple] = {}  # name -> (recipe, scoring settings, slices)
    grids: dict[str, SliceSet] = {}
    for name, recipe in recipes.items():
        for grid in args.resolutions or [None]:
            arm, arm_settings = at_resolution(recipe, settings, grid) if grid else (recipe, settings)
            key = f"{arm.data.spacing[0]}:{arm.data.slice_size}"
            if key not in grids:  # the recipe's own grid keeps its cache (--slices or the recipe's out folder)
                cache = Path(args.slices or first.out) if arm.data == first.data else \
                    Path(args.out) / f"slices-{key.replace(':', 'mm-')}"
                grids[key] = all_slices(arm, cache)
            arms[f"{name}@{grid}" if grid else name] = (arm, arm_settings, grids[key])
    patients = lesion_patients(Path(args.data), list(first.data.all_excluded))
    print(f"# leave-patients-out folds, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{platform.processor() or platform.machine()}, {args.threads} threads, {args.steps} steps per fold, "
          f"{len(patients)} patients in {args.folds} folds, models {', '.join(arms)}"
          + (f", blobs from step {args.blob_from}" if args.blob_from is not None else ""))
    for name, (arm, _, slices) in arms.items():
        print(f"{name}: {len(slices)} slices of {arm.data.slice_size} px at {arm.data.spacing[0]} mm", flush=True)
    per_fold = []
    for k in range(args.folds):
        left_out = patients[k::args.folds]
        saved = Path(args.out) / f"fold{k + 1}{'-per-contrast' if args.per_contrast else ''}.json"
        if args.only and k + 1 not in args.only:
            if saved.is_file():
                per_fold.append(json.loads(saved.read_text()))
            continue
        print(f"\n## Fold {k + 1}: left out {', '.join(left_out)}", flush=True)
        cases = patient_cases(Path(args.data), left_out)
        earlier = Path(args.out) / f"fold{k + 1}.json"
        results = json.loads(earlier.read_text()) if args.per_contrast and earlier.is_file() else {}
        for name, (arm, arm_settings, slices) in arms.items():
            t0 = time.perf_counter()
            if name in results:
                continue
            folder = train_fold(arm, slices, left_out, args.steps, Path(args.out) / name / f"fold{k + 1}",
                                args.blob_from)
            print(f"{name}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
            results[name] = evaluate(str(folder), cases, arm_settings)
        for name, (arm, arm_settings, slices) in arms.items():
            if args.per_contrast:
                t0 = time.perf_counter()
                results[f"{name} per contrast"] = per_contrast(arm, slices, left_out, args.steps // 3,
                                                               Path(args.out) / f"{name}-per-contrast" / f"fold{k + 1}",
                                                               cases, arm_settings)
                print(f"{name} per contrast: trained and scored in {time.perf_counter() - t0:.0f} s", flush=True)
        if "intensity" not in results:
            results["intensity"] = evaluate("intensity", cases, settings)
        for model, table in results.items():
            for group in sorted(g for g in table if g.startswith("all")):
                r = table[group]
                print(f"fold {k + 1} {group} {model}: AUPRC pooled {r['auprc']:.3f}, best Dice pooled {r['dice*']:.3f}, "
                      f"per scan {r['scan_auprc_mean']:.3f} [{r['scan_auprc_min']:.3f}, {r['scan_auprc_max']:.3f}] "
                      f"(n={r['n']})", flush=True)
        per_fold.append(results)
        saved.write_text(json.dumps(results, indent=1))
    summarise(per_fold)


if __name__ == "__main__":
    main()

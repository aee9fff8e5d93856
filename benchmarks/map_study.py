"""Choose a restoration model's map rule on patients that are NOT evaluation cases: pooled and per-scan
voxel AUPRC and best Dice for candidate rules, per contrast, with the spread over patients.

The choice set is the recipe's validation patients plus the lesion-bearing volumes of training
patients (only their lesion-free slices were trained on, the lesions themselves never). Components
(input, reconstruction, healed decodes per healing depth t0 and noise draw) are computed once per
model and case and cached, so many rules are compared cheaply. Usage:
python benchmarks/map_study.py --model runs/cond/model [--t0 150 250 350] [--draws 2] [--cache runs/study]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomaly.config import PostprocessConfig, PreprocessConfig
from anomaly.contrast import guess_contrast
from anomaly.mapnorm import robust_z
from anomaly.median import parse_median_sizes
from anomaly.metrics import auprc, best_dice
from anomaly.models import load_model
from anomaly.models.routing import model_for
from anomaly.preprocess import prepare_volume
from anomaly.scoring import batch_to_slices, postprocess, slices_to_batch
from anomaly.training.data import lesion_on_grid
from anomaly.training.vae import coarse_noise
from anomaly.volume import load_volume

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

#: (dataset, case, contrasts, label file): validation patients first, then training patients' lesions.
CHOICE_SET = [
    ("brats2018", "Brats18_TCIA10_628_1", ("t1", "t2", "flair"), "tumor_labels"),
    ("ms-open", "patient19", ("t1", "t2", "flair"), "lesion_mask"),
    ("brats2018", "Brats18_CBICA_ABM_1", ("t1", "t2", "flair"), "tumor_labels"),
    ("brats2018", "Brats18_TCIA01_201_1", ("t1", "t2", "flair"), "tumor_labels"),
    ("brats2018", "Brats18_2013_23_1", ("t1", "t2", "flair"), "tumor_labels"),
    ("brats2018", "Brats18_TCIA02_606_1", ("t1", "t2", "flair"), "tumor_labels"),
    ("brats2013", "pat0003", ("flair",), "tumor_labels"),
    ("brats2013", "pat0004", ("flair",), "tumor_labels"),
    ("ms-open", "patient07", ("t1", "t2", "flair"), "lesion_mask"),
]


@torch.inference_mode()
def image_components(restoration, prepared, contrast: str | None, iterations: int,  # noqa: ANN001
                     noise_draws: int) -> dict[str, np.ndarray]:
    """Image-space restorations: ``restored`` (one pass), ``restored_it{k}`` (the restoration applied k
    times) and ``restored_nd{n}`` (the mean over n restorations of copies with the training's coarse noise
    at its middle level added inside the brain: a noise-draw ensemble)."""
    keys = ["restored", *(f"restored_it{k}" for k in range(2, iterations + 1))]
    keys += [f"restored_nd{noise_draws}"] if noise_draws > 0 else []
    out = {key: np.zeros_like(prepared.image) for key in keys}
    config = restoration.config
    std = float(np.mean(config.noise_std))
    mask = prepared.mask.astype(np.float32)
    for start in range(0, len(prepared.slices), 32):
        index = prepared.slices[start:start + 32]
        x = slices_to_batch(prepared.image, index).clamp(0, 1)
        brain = slices_to_batch(mask, index)
        y = restoration.restore(x, contrast=contrast, mask=brain)
        out["restored"][:, :, index] = batch_to_slices(y)
        for k in range(2, iterations + 1):
            y = restoration.restore(y, contrast=contrast, mask=brain)
            out[f"restored_it{k}"][:, :, index] = batch_to_slices(y)
        if noise_draws > 0:
            generator = torch.Generator().manual_seed(start)
            total = torch.zeros_like(x)
            for _ in range(noise_draws):
                noisy = x + coarse_noise(x, 1.0, config.noise_grid, generator) * std * brain
                total += restoration.restore(noisy.clamp(0, 1), contrast=contrast, mask=brain)
            out[f"restored_nd{noise_draws}"][:, :, index] = batch_to_slices(total / noise_draws)
    return out


def components(model, path: Path, label: Path, t0s: tuple[int, ...], draws: int, iterations: int = 1,  # noqa: ANN001
               noise_draws: int = 0) -> dict[str, np.ndarray]:
    """x, brain mask, truth, reconstruction and healed decodes (``healed{t0}_{draw}``) on the model grid."""
    contrast = guess_contrast(path)
    model = model_for(model, contrast)  # the route that scores this contrast, where the model has routes
    prepared = prepare_volume(load_volume(path), PreprocessConfig(), model.input_spec)
    out = {"x": prepared.image.copy(), "brain": prepared.mask, "truth": lesion_on_grid(label, prepared)}
    if getattr(model.restoration, "space", "latent") == "image":  # image-space restoration of the input
        return out | image_components(model.restoration, prepared, contrast, iterations, noise_draws)
    out["recon"] = np.zeros_like(prepared.image)
    keys = [f"healed{t0}_{d}" for t0 in t0s for d in range(draws)]
    for key in keys:
        out[key] = np.zeros_like(prepared.image)
    base = model.restoration.config
    for start in range(0, len(prepared.slices), 32):
        index = prepared.slices[start:start + 32]
        x = slices_to_batch(prepared.image, index).clamp(0, 1)
        with model._autocast():
            z = model.vae.encode(model._to_model(x)).latent_dist.mode()
            out["recon"][:, :, index] = batch_to_slices(model._from_model(model.vae.decode(z).sample))
            for t0 in t0s:
                model.restoration.config = dataclasses.replace(base, t0=t0)
                generator = torch.Generator().manual_seed(start)
                for d in range(draws):
                    zh = model.restoration.heal(z.float(), generator=generator, contrast=contrast).to(z.dtype)
                    out[f"healed{t0}_{d}"][:, :, index] = batch_to_slices(
                        model._from_model(model.vae.decode(zh).sample))
    model.restoration.config = base
    return out


def cached_components(model, model_dir: str, cache: Path, path: Path, label: Path, t0s: tuple[int, ...],  # noqa: ANN001
                      draws: int, iterations: int = 1, noise_draws: int = 0) -> dict[str, np.ndarray]:
    extra = f"|it{iterations}|nd{noise_draws}" if iterations > 1 or noise_draws else ""
    # the weights' hash and precision are part of the key: a model folder retrained in place, or scored in
    # another precision, never reuses stale components
    weights = f"{getattr(model, 'weights_hash', '')}|{getattr(model_for(model, None), 'precision', '')}"
    key = hashlib.sha256(f"{Path(model_dir).resolve()}|{weights}|{path}|{t0s}|{draws}{extra}".encode()).hexdigest()[:16]
    file = cache / f"{key}.npz"
    if file.is_file():
        return dict(np.load(file))
    comp = components(model, path, label, t0s, draws, iterations, noise_draws)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(file, **{k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in comp.items()})
    return {k: (v.astype(np.float32) if v.dtype == np.float16 else v) for k, v in comp.items()}


Rule = Callable[[dict[str, np.ndarray]], np.ndarray]


def residual(c: dict[str, np.ndarray], t0: int, sign: str, draws: int) -> np.ndarray:
    if "restored" in c:  # image-space restoration: the input minus its restored version
        diff = c["x"] - c["restored"]
        return np.abs(diff) if sign == "abs" else np.clip(diff, 0, None) if sign == "pos" else np.clip(-diff, 0, None)
    total = np.zeros_like(c["x"])
    for d in range(draws):
        diff = c["recon"] - c[f"healed{t0}_{d}"]
        total += np.abs(diff) if sign == "abs" else np.clip(diff if sign == "pos" else -diff, 0, None)
    return total / draws


def signed_z(c: dict[str, np.ndarray], sign: str, restored: str = "restored") -> np.ndarray:
    """The signed difference (input minus restored) z-scored over the brain, then the sign kept: the
    spread of healthy tissue is measured before clipping, where it is stable."""
    z = robust_z(c["x"] - c[restored], c["brain"])
    return np.abs(z) if sign == "abs" else np.clip(z if sign == "pos" else -z, 0, None)


def intensity_term(c: dict[str, np.ndarray], floor: float | None) -> np.ndarray:
    """Raw intensity (floor None), or intensity above the brain's ``floor`` percentile."""
    if floor is None:
        return c["x"]
    return np.clip(c["x"] - np.percentile(c["x"][c["brain"]], floor), 0, None)


def build_rules(t0s: tuple[int, ...], draws: int, rules_for: tuple[str, ...] = ()) -> dict[str, Rule]:
    """Candidate rules; ``rules_for`` names extra components the model has (``restored``: image space)."""
    rules: dict[str, Rule] = {"intensity": lambda c: c["x"],
                              "z(intensity)": lambda c: robust_z(c["x"], c["brain"])}
    for t0 in t0s:
        for sign in ("pos", "abs", "neg"):
            for n in sorted({1, draws}):
                tag = f"{sign}{t0}" + (f"x{n}" if n > 1 else "")
                rules[tag] = lambda c, t0=t0, s=sign, n=n: residual(c, t0, s, n)
                rules[f"z({tag})"] = lambda c, t0=t0, s=sign, n=n: robust_z(residual(c, t0, s, n), c["brain"])
                for w in (0.5, 1.0, 2.0):
                    rules[f"z({tag})+{w}z(x)"] = lambda c, t0=t0, s=sign, n=n, w=w: (
                        robust_z(residual(c, t0, s, n), c["brain"]) + w * robust_z(c["x"], c["brain"]))
                    rules[f"z({tag})+{w}zx>p99"] = lambda c, t0=t0, s=sign, n=n, w=w: (
                        robust_z(residual(c, t0, s, n), c["brain"])
                        + w * robust_z(intensity_term(c, 99), c["brain"], scale_of=c["x"]))
                if "restored" in rules_for:
                    rules[f"zs({tag})"] = lambda c, s=sign: signed_z(c, s)
                    for variant in (v for v in rules_for if v.startswith("restored_")):
                        rules[f"zs_{variant[9:]}({tag})"] = lambda c, s=sign, v=variant: signed_z(c, s, v)
                        rules[f"zs_{variant[9:]}({tag})+4.0z(x)"] = lambda c, s=sign, v=variant: (
                            signed_z(c, s, v) + 4.0 * robust_z(c["x"], c["brain"]))
                    if sign != "abs":  # asymmetric: the expected sign plus a share of the other one
                        other = "neg" if sign == "pos" else "pos"
                        for a in (0.25, 0.5):
                            rules[f"zs({tag})+{a}zs({other})"] = lambda c, s=sign, o=other, a=a: (
                                signed_z(c, s) + a * signed_z(c, o))
                    for w in (0.25, 0.5, 1.0, 2.0, 4.0):
                        rules[f"zs({tag})+{w}z(x)"] = lambda c, s=sign, w=w: signed_z(c, s) + w * robust_z(c["x"], c["brain"])
                rules[f"{tag}+1.5x"] = lambda c, t0=t0, s=sign, n=n: residual(c, t0, s, n) + 1.5 * c["x"]
                rules[f"{tag}+1.5x>p99"] = lambda c, t0=t0, s=sign, n=n: residual(c, t0, s, n) + 1.5 * intensity_term(c, 99)
    return rules


def evaluate(per_case: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Pooled AUPRC and best Dice over the cases, the per-scan AUPRC's mean and range, and each scan's
    AUPRC in the set's order (``per_scan``), so two models can be compared patient by patient."""
    maps = [m for m, _ in per_case]
    truths = [t for _, t in per_case]
    v, y = np.concatenate(maps), np.concatenate(truths)
    scans = [auprc(m, t) for m, t in per_case if t.any()]
    return {"pooled_auprc": auprc(v, y), "pooled_dice": best_dice(v, y)[0],
            "scan_auprc_mean": float(np.mean(scans)), "scan_auprc_min": float(np.min(scans)),
            "scan_auprc_max": float(np.max(scans)), "n": len(scans),
            "per_scan": " ".join(f"{a:.3f}" for a in scans)}


def leave_one_patient_out(results: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]],
                          patients: dict[str, list[str]], rows: list[dict], top: int = 6) -> None:
    """Choose the rule on all patients but one (pooled AUPRC, among the ``top`` rules overall), measure it
    on that one: how well a choice made on some patients carries to an unseen one, against intensity."""
    print("\n## Leave one patient out: rule chosen on the others, AUPRC on the left-out patient")
    print("| contrast | left out | chosen rule | its AUPRC | intensity AUPRC |")
    print("| --- | --- | --- | --- | --- |")
    for group in sorted(patients):
        ranked = sorted((r for r in rows if r["contrast"] == group), key=lambda r: -r["pooled_auprc"])
        names = [r["rule"] for r in ranked[:top]]
        for i, patient in enumerate(patients[group]):
            scores = {}
            for name in names:
                pairs = [p for j, p in enumerate(results[(group, name)]) if j != i]
                scores[name] = auprc(np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs]))
            best = max(scores, key=scores.__getitem__)
            held = results[(group, best)][i]
            base = results[(group, "intensity")][i] if (group, "intensity") in results else None
            base_text = f"{auprc(*base):.3f}" if base is not None and base[1].any() else "n/a"
            held_text = f"{auprc(*held):.3f}" if held[1].any() else "n/a"
            print(f"| {group} | {patient} | {best} | {held_text} | {base_text} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--t0", type=int, nargs="+", default=[150, 250, 350])
    parser.add_argument("--draws", type=int, default=1)
    parser.add_argument("--cache", default="runs/study")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--rules", nargs="*", default=None, help="only these rules (default: all)")
    parser.add_argument("--out", default=None, help="write the table as CSV here")
    parser.add_argument("--iterations", type=int, default=1, help="image space: also the restoration applied 2..N times")
    parser.add_argument("--noise-draws", type=int, default=0,
                        help="image space: also the mean restoration of N copies with coarse noise added")
    parser.add_argument("--patients", type=int, default=len(CHOICE_SET), help="only the first N patients of the set")
    parser.add_argument("--contrasts", nargs="+", default=["t1", "t2", "flair"], choices=("t1", "t2", "flair"),
                        help="only scans of these contrasts")
    parser.add_argument("--median-sizes", type=parse_median_sizes, nargs="+", default=None,
                        help="each rule with each of these in-plane median sizes (pixels; 1,7,13: the mean of "
                             "those medians) instead of the model's own")
    parser.add_argument("--through-plane-mm", type=float, nargs="+", default=None,
                        help="each rule with each of these Gaussian sigmas across slices (mm; 0 = off) "
                             "instead of the model's own")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    model = load_model(args.model, precision=args.precision)
    base = model_for(model, None)  # a model routed by contrast: its base decides the kind of restoration
    t0s = tuple(args.t0) if getattr(base.restoration, "space", "latent") == "latent" else (0,)
    image = getattr(base.restoration, "space", "latent") == "image"
    variants = [f"restored_it{k}" for k in range(2, args.iterations + 1)]
    variants += [f"restored_nd{args.noise_draws}"] if args.noise_draws else []
    rules = build_rules(t0s, args.draws, ("restored", *variants) if image else ())
    if args.rules:
        rules = {k: v for k, v in rules.items() if k in set(args.rules)}
    # None: each route's own median filter
    posts = {(size, sigma): PostprocessConfig(median_size=size, through_plane_mm=sigma)
             for size in args.median_sizes or [None] for sigma in args.through_plane_mm or [None]}
    results: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
    patients: dict[str, list[str]] = defaultdict(list)
    for dataset, case, contrasts, label in CHOICE_SET[:args.patients]:
        folder = Path(args.data) / dataset / case
        for contrast in (c for c in contrasts if c in args.contrasts):
            comp = cached_components(model, args.model, Path(args.cache), folder / f"{contrast}.nii.gz",
                                     folder / f"{label}.nii.gz", t0s, args.draws, args.iterations,
                                     args.noise_draws)
            group = "T1" if contrast == "t1" else contrast.upper()
            route = model_for(model, contrast)
            for name, rule in rules.items():
                raw = rule(comp).astype(np.float32)
                for size, post in posts.items():
                    grid, scored = postprocess(raw, comp["brain"], post, tuple(route.input_spec.spacing),
                                               route.median_size, route.through_plane_mm)
                    median, sigma = size
                    shown = median if not isinstance(median, tuple) else ",".join(map(str, median))
                    key = name + ("" if median is None else f" median {shown}") + (
                        "" if sigma is None else f" z{sigma:g}mm")
                    results[(group, key)].append((grid[scored], comp["truth"][scored]))
            patients[group].append(f"{dataset}/{case}")
            print(f"scored {dataset}/{case}/{contrast}", flush=True)
    rows = []
    for (group, name), per_case in sorted(results.items()):
        rows.append({"contrast": group, "rule": name, **evaluate(per_case)})
    for group in sorted({r["contrast"] for r in rows}):
        print(f"\n## {group}")
        print("| rule | pooled AUPRC | pooled best Dice | per-scan AUPRC mean [min, max] | n | per scan |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in sorted((r for r in rows if r["contrast"] == group), key=lambda r: -r["pooled_auprc"]):
            print(f"| {r['rule']} | {r['pooled_auprc']:.3f} | {r['pooled_dice']:.3f} | {r['scan_auprc_mean']:.3f} "
                  f"[{r['scan_auprc_min']:.3f}, {r['scan_auprc_max']:.3f}] | {r['n']} | {r['per_scan']} |")
    leave_one_patient_out(results, patients, rows)
    if args.out:
        import csv

        with open(args.out, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()

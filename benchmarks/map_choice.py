"""Choose the map rule and healing depth of a restoration model on the VALIDATION patients of its recipe
(never on the evaluation cases): voxel AUPRC per candidate rule, pooled per group.

Candidates: the sign of (reference - healed decode) with the plain reconstruction or the input as the
reference, and the positive or absolute residual plus a multiple of the normalised intensity, counted
in full or only above a percentile of the scan's brain (the per-contrast ``map.intensity_floor``).
Groups are split by contrast, so each contrast's floor is chosen on its own. Usage:
python benchmarks/map_choice.py --model runs/default/model [--t0 150 250 400] [DATA_DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from anomaly.config import PostprocessConfig, PreprocessConfig
from anomaly.metrics import auprc
from anomaly.models import load_model
from anomaly.preprocess import prepare_volume
from anomaly.scoring import batch_to_slices, postprocess, slices_to_batch
from anomaly.synth import IN_RANGE_KINDS, KINDS, add_lesions
from anomaly.training.data import lesion_on_grid
from anomaly.volume import Volume, load_mask, load_volume

Rule = Callable[[dict[str, np.ndarray]], np.ndarray]


def _above(c: dict[str, np.ndarray], percentile: float) -> np.ndarray:
    """Normalised intensity above the brain's ``percentile`` (the map's intensity floor)."""
    return np.clip(c["x"] - np.percentile(c["x"][c["brain"]], percentile), 0, None)


def rules(x_weights: tuple[float, ...] = (0.1, 0.25, 0.5), floors: tuple[float, ...] = (90, 95, 99)) -> dict[str, Rule]:
    out: dict[str, Rule] = {
        "intensity": lambda c: c["x"],
        "abs(x-recon)": lambda c: np.abs(c["x"] - c["recon"]),
        "pos(recon-healed)": lambda c: np.clip(c["recon"] - c["healed"], 0, None),
        "abs(recon-healed)": lambda c: np.abs(c["recon"] - c["healed"]),
        "pos(x-healed)": lambda c: np.clip(c["x"] - c["healed"], 0, None),
        "abs(x-healed)": lambda c: np.abs(c["x"] - c["healed"]),
    }
    for w in x_weights:
        out[f"pos(recon-healed)+{w}x"] = lambda c, w=w: np.clip(c["recon"] - c["healed"], 0, None) + w * c["x"]
        out[f"abs(recon-healed)+{w}x"] = lambda c, w=w: np.abs(c["recon"] - c["healed"]) + w * c["x"]
        for q in floors:
            out[f"abs(recon-healed)+{w}x>p{q:g}"] = (
                lambda c, w=w, q=q: np.abs(c["recon"] - c["healed"]) + w * _above(c, q))
    return out


@torch.inference_mode()
def components(model, prepared, t0s: tuple[int, ...], seed: int = 0, batch: int = 32) -> dict[str, np.ndarray]:  # noqa: ANN001
    """Input, plain reconstruction and healed decode (one per t0) on the model grid."""
    out = {"x": prepared.image.copy(), "recon": np.zeros_like(prepared.image)}
    for t0 in t0s:
        out[f"healed{t0}"] = np.zeros_like(prepared.image)
    base_config = model.restoration.config
    for start in range(0, len(prepared.slices), batch):
        index = prepared.slices[start:start + batch]
        x = slices_to_batch(prepared.image, index)
        with model._autocast():
            z = model.vae.encode(model._to_model(x)).latent_dist.mode()
            out["recon"][:, :, index] = batch_to_slices(model._from_model(model.vae.decode(z).sample))
            for t0 in t0s:
                model.restoration.config = dataclasses.replace(base_config, t0=t0)
                zh = model.restoration.heal(z.float(), generator=torch.Generator().manual_seed(seed)).to(z.dtype)
                out[f"healed{t0}"][:, :, index] = batch_to_slices(model._from_model(model.vae.decode(zh).sample))
    model.restoration.config = base_config
    return out


def validation_cases(root: Path) -> list[tuple[str, Volume, np.ndarray, np.ndarray | None]]:
    """(group, volume, truth, ignore) for the recipe's validation patients and synthetic lesions on them."""
    cases = []
    brats = root / "brats2018" / "Brats18_TCIA10_628_1"
    ms = root / "ms-open" / "patient19"
    tumour = load_mask(brats / "tumor_labels.nii.gz")
    lesions = load_mask(ms / "lesion_mask.nii.gz")
    for contrast in ("t1", "t2", "flair"):
        cases.append((f"val tumour {contrast.upper()}", load_volume(brats / f"{contrast}.nii.gz"), tumour, None))
        cases.append((f"val MS {contrast.upper()}", load_volume(ms / f"{contrast}.nii.gz"), lesions, None))
    for folder, real in ((ms, lesions), (brats, tumour)):
        ignore = ndimage.binary_dilation(real, iterations=5)  # synthetic lesions stay clear of the real ones
        for contrast in ("t1", "t2", "flair"):
            vol = load_volume(folder / f"{contrast}.nii.gz")
            for label, kinds in (("in-range", tuple(sorted(IN_RANGE_KINDS))), ("all kinds", KINDS)):
                data, truth = add_lesions(vol.data, (vol.data > 0) & ~ignore, vol.spacing, kinds=kinds, n=4,
                                          seed=11, radius_mm=(5.0, 12.0))
                cases.append((f"val synthetic {label} {contrast.upper()}", Volume(data, vol.affine, vol.path),
                              truth, ignore))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    parser.add_argument("--model", required=True)
    parser.add_argument("--t0", type=int, nargs="+", default=[150, 250, 400])
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--x-weights", type=float, nargs="+", default=[0.5, 1.5],
                        help="weights of the intensity term added to the residual")
    parser.add_argument("--floors", type=float, nargs="+", default=[90, 95, 99],
                        help="brain percentiles tried as the intensity floor")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load_model(args.model, precision=args.precision)
    pooled: dict[tuple[str, str], tuple[list, list]] = defaultdict(lambda: ([], []))
    for group, volume, truth, ignore in validation_cases(Path(args.data)):
        prepared = prepare_volume(volume, PreprocessConfig(), model.input_spec)
        comps = components(model, prepared, tuple(args.t0))
        label_vol = Volume(truth.astype(np.float32), volume.affine, volume.path)
        tmp = Path("/tmp/_map_choice_truth.nii.gz")
        from anomaly.volume import save_nifti

        save_nifti(label_vol.data, volume.affine, tmp)
        grid_truth = lesion_on_grid(tmp, prepared)
        grid_ignore = None
        if ignore is not None:
            save_nifti(ignore.astype(np.float32), volume.affine, tmp)
            grid_ignore = lesion_on_grid(tmp, prepared)
        for t0 in args.t0:
            c = {"x": comps["x"], "recon": comps["recon"], "healed": comps[f"healed{t0}"], "brain": prepared.mask}
            for name, rule in rules(tuple(args.x_weights), tuple(args.floors)).items():
                if t0 != args.t0[0] and "healed" not in name:
                    continue
                cleaned, scored = postprocess(rule(c), prepared.mask, PostprocessConfig(), prepared.spacing,
                                             model.median_size, model.through_plane_mm)
                keep = scored if grid_ignore is None else scored & ~grid_ignore
                key = name if "healed" not in name else f"{name} t0={t0}"
                pooled[(group, key)][0].append(cleaned[keep])
                pooled[(group, key)][1].append(grid_truth[keep])
        print(f"done {group}", flush=True)
    groups = sorted({g for g, _ in pooled})
    names = sorted({n for _, n in pooled})
    print("| rule | " + " | ".join(groups) + " | mean |")
    print("|---" * (len(groups) + 2) + "|")
    for name in names:
        vals = [auprc(np.concatenate(pooled[(g, name)][0]), np.concatenate(pooled[(g, name)][1])) for g in groups]
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {np.mean(vals):.3f} |", flush=True)


if __name__ == "__main__":
    main()

"""Two models, one map: on the choice set of ``map_study.py`` (never the evaluation cases), the native-grid
map of each member alone against their voxelwise mean and maximum, pooled and per scan, per contrast.

A member is a model (``default``, a folder) scored as it would be, or ``MODEL@base`` / ``MODEL@t2``: one
part of a model routed by contrast, used for every contrast (``default@base`` is the 1.5 mm network,
``default@t2`` its 1 mm T2 route). Maps are compared where they live in the store, on the scan's own grid,
over the voxels both members score. Not a test. Usage:
python benchmarks/map_mean.py --members default@base default@t2 [--contrasts t1 t2 flair]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from map_study import CHOICE_SET, DATA, evaluate

from anomaly.config import PreprocessConfig, ScoringSettings
from anomaly.models import load_model
from anomaly.models.base import SliceModel
from anomaly.models.routing import model_for
from anomaly.scoring import score_volume
from anomaly.volume import load_mask, load_volume


def member(spec: str, precision: str) -> SliceModel:
    """``MODEL`` as loaded, or one part of it: ``MODEL@base`` (its own network) or ``MODEL@CONTRAST``."""
    name, _, part = spec.partition("@")
    model = load_model(name, precision=precision)
    return model if not part else model_for(model, None if part == "base" else part)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", nargs=2, required=True, metavar="MODEL[@PART]")
    parser.add_argument("--contrasts", nargs="+", default=["t1", "t2", "flair"], choices=("t1", "t2", "flair"))
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", default=str(DATA))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    first, second = (member(spec, args.precision) for spec in args.members)
    voxels: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
    for dataset, case, contrasts, label in CHOICE_SET:
        folder = Path(args.data) / dataset / case
        truth = load_mask(folder / f"{label}.nii.gz")
        for contrast in (c for c in contrasts if c in args.contrasts):
            volume = load_volume(folder / f"{contrast}.nii.gz")
            settings = ScoringSettings(preprocess=dataclasses.replace(PreprocessConfig(), contrast=contrast),
                                       precision=args.precision)
            a, b = score_volume(volume, first, settings), score_volume(volume, second, settings)
            inside = a.brain_mask & b.brain_mask
            maps = {args.members[0]: a.anomaly, args.members[1]: b.anomaly,
                    "mean": 0.5 * (a.anomaly + b.anomaly), "max": np.maximum(a.anomaly, b.anomaly)}
            for name, values in maps.items():
                voxels[(contrast.upper(), name)].append((values[inside], truth[inside]))
            print(f"scored {dataset}/{case}/{contrast}", flush=True)
    for contrast in sorted({c for c, _ in voxels}):
        print(f"\n## {contrast}\n| map | pooled AUPRC | pooled best Dice | per-scan AUPRC mean [min, max] | per scan |")
        print("| --- | --- | --- | --- | --- |")
        for name in (*args.members, "mean", "max"):
            r = evaluate(voxels[(contrast, name)])
            print(f"| {name} | {r['pooled_auprc']:.3f} | {r['pooled_dice']:.3f} | {r['scan_auprc_mean']:.3f} "
                  f"[{r['scan_auprc_min']:.3f}, {r['scan_auprc_max']:.3f}] | {r['per_scan']} |", flush=True)


if __name__ == "__main__":
    main()

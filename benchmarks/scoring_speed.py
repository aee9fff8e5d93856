"""Scoring throughput on real brains: sequential vs read-ahead executor, fp32 vs bf16, the gzip layer
(ISA-L, the default, against the standard library's zlib for reading inputs and writing outputs), and
the exact shortcuts of post-processing (copy on a shared lattice, hole filling by labels, the median
where it is read) against the plain MONAI and scipy calls they replace.

Prints seconds per brain for each variant and ratios against the sequential fp32 baseline run in the
same process. Usage: python benchmarks/scoring_speed.py [--model default] [--n 4] [--contrast t2] [--compare latent-healer] [DATA_DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from monai.transforms import FillHoles
from scipy import ndimage

from anomaly import gzipio, preprocess, scoring
from anomaly.config import ScoringSettings, native_bf16
from anomaly.models import load_model
from anomaly.volume import file_sha256
from pipelines.executors import LocalExecutor
from pipelines.work import ScanTask, score_scan


def brains(root: Path, n: int, contrast: str = "t2") -> list[Path]:
    found = (sorted(root.glob(f"ms-open/patient*/{contrast}.nii.gz"))
             + sorted(root.glob(f"brats2018/*/{contrast}.nii.gz")))
    if not found:
        raise SystemExit(f"no {contrast} volumes under {root}; pass the shared data folder")
    return found[:n]


def run(paths: list[Path], model_name: str, precision: str, read_ahead: bool, out: Path) -> float:
    model = load_model(model_name, precision=precision)
    settings = ScoringSettings(precision=precision)
    tasks = [ScanTask(p, f"{p.parent.name}_{i}", file_sha256(p), out) for i, p in enumerate(paths)]
    start = time.perf_counter()
    if read_ahead:
        outcomes = list(LocalExecutor(prefetch=2).map(tasks, model, settings))
    else:
        outcomes = [score_scan(t, model, settings) for t in tasks]
    seconds = time.perf_counter() - start
    bad = [o.error for o in outcomes if o.status != "ok"]
    if bad:
        raise SystemExit(f"scoring failed: {bad}")
    return seconds / len(paths)


@contextlib.contextmanager
def plain_calls() -> Iterator[None]:
    """Score without the exact shortcuts: every resampling through MONAI's SpatialResample, holes filled
    by MONAI's FillHoles, the median filter by scipy over the whole brain box."""
    def monai_fill(mask: np.ndarray) -> np.ndarray:
        return np.asarray(FillHoles()(torch.as_tensor(mask[None]).to(torch.uint8)))[0] > 0

    def scipy_median(values: np.ndarray, size: int, where: np.ndarray | None = None) -> np.ndarray:
        return ndimage.median_filter(values, size=(size, size, 1))

    saved = preprocess.lattice_map, preprocess.fill_holes, scoring.median_in_plane
    preprocess.lattice_map, preprocess.fill_holes, scoring.median_in_plane = (
        lambda *a, **k: None, monai_fill, scipy_median)
    try:
        yield
    finally:
        preprocess.lattice_map, preprocess.fill_holes, scoring.median_in_plane = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data", nargs="?", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--model", default="default")
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--contrast", choices=["t1", "t2", "flair"], default="t2",
                        help="time brains of this contrast (a model may route each contrast to its own grid)")
    parser.add_argument("--bf16", action="store_true", help="time bf16 even where the CPU has no bf16 units")
    parser.add_argument("--compare", nargs="*", default=[], metavar="MODEL",
                        help="also time these models (sequential fp32), as ratios against --model")
    args = parser.parse_args()
    paths = brains(Path(args.data), args.n, args.contrast)
    out = Path(os.environ.get("TMPDIR", "/tmp")) / "anomaly-bench"
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; model {args.model}; {len(paths)} {args.contrast} brains")
    run(paths[:1], args.model, "fp32", False, out)  # warm-up: first-call allocations and lazy imports
    base = run(paths, args.model, "fp32", False, out)
    print(f"sequential fp32   {base:6.2f} s/brain   1.00x")
    variants = [("read-ahead fp32", "fp32", True)]
    if native_bf16("cpu") or args.bf16:
        variants += [("sequential bf16", "bf16", False), ("read-ahead bf16", "bf16", True)]
    else:
        print("bf16 skipped: this CPU has no native bf16 units (PyTorch would emulate it, many times slower); "
              "--bf16 runs it anyway")
    for label, precision, ahead in variants:
        t = run(paths, args.model, precision, ahead, out)
        print(f"{label:17s} {t:6.2f} s/brain   {base / t:4.2f}x")
    if gzipio.ACCELERATED:
        isal, gzipio._isal_gzip = gzipio._isal_gzip, None  # the standard library's zlib for one pass
        try:
            t = run(paths, args.model, "fp32", False, out)
        finally:
            gzipio._isal_gzip = isal
        print(f"{'seq. fp32, zlib':17s} {t:6.2f} s/brain   {base / t:4.2f}x (gzip by zlib instead of ISA-L)")
    with plain_calls():
        t = run(paths, args.model, "fp32", False, out)
    print(f"{'seq. fp32, plain':17s} {t:6.2f} s/brain   {base / t:4.2f}x (MONAI resampling and hole filling, "
          "scipy median everywhere)")
    for other in args.compare:
        run(paths[:1], other, "fp32", False, out)
        t = run(paths, other, "fp32", False, out)
        print(f"{other} fp32: {t:6.2f} s/brain   {base / t:4.2f}x (of {args.model}'s speed)")


if __name__ == "__main__":
    main()

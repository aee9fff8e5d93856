"""Scoring throughput on real brains: sequential vs read-ahead executor, fp32 vs bf16, the gzip layer
(ISA-L, the default, against the standard library's zlib for reading inputs and writing outputs), and
the exact shortcuts of post-processing (copy on a shared lattice, hole filling by labels, the median
where it is read) against the plain MONAI and scipy calls they replace, and the denoising UNet frozen per
contrast (embedding folded into biases) against the UNet as loaded.

Prints seconds per brain for each variant and ratios against the sequential fp32 baseline run in the
same process. Usage: python benchmarks/scoring_speed.py [--model default] [--n 4] [--contrast t2] [--rounds 3] [--compare latent-healer]
[DATA_DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from monai.transforms import FillHoles
from scipy import ndimage

from anomaly import gzipio, median, preprocess
from anomaly.config import ScoringSettings, native_bf16
from anomaly.models import load_model
from anomaly.models.denoiser import ImageDenoiser
from anomaly.models.routing import model_for
from anomaly.volume import file_sha256
from pipelines.executors import LocalExecutor
from pipelines.work import ScanTask, score_scan


def brains(root: Path, n: int, contrast: str = "t2") -> list[Path]:
    found = (sorted(root.glob(f"ms-open/patient*/{contrast}.nii.gz"))
             + sorted(root.glob(f"brats2018/*/{contrast}.nii.gz")))
    if not found:
        raise SystemExit(f"no {contrast} volumes under {root}; pass the shared data folder")
    return found[:n]


def run(paths: list[Path], model_name: str, precision: str, read_ahead: bool, out: Path,
        unfolded: str | None = None) -> float:
    model = load_model(model_name, precision=precision)
    if unfolded is not None:  # the diffusers UNet as loaded (under autocast for bf16), not frozen per contrast
        restoration = getattr(model_for(model, unfolded), "restoration", None)
        if isinstance(restoration, ImageDenoiser):
            restoration.for_scoring(None)
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

    saved = preprocess.lattice_map, preprocess.fill_holes, median.median_in_plane
    preprocess.lattice_map, preprocess.fill_holes, median.median_in_plane = (
        lambda *a, **k: None, monai_fill, scipy_median)
    try:
        yield
    finally:
        preprocess.lattice_map, preprocess.fill_holes, median.median_in_plane = saved


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
    parser.add_argument("--rounds", type=int, default=3,
                        help="time every variant once per round, in turn, and report each one's median: a "
                             "shared machine's drift then falls on all variants alike")
    args = parser.parse_args()
    paths = brains(Path(args.data), args.n, args.contrast)
    out = Path(os.environ.get("TMPDIR", "/tmp")) / "anomaly-bench"
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; model {args.model}; {len(paths)} {args.contrast} brains; "
          f"median of {args.rounds} interleaved rounds")
    bf16 = native_bf16("cpu") or args.bf16
    if not bf16:
        print("bf16 skipped: this CPU has no native bf16 units (PyTorch would emulate it, many times slower); "
              "--bf16 runs it anyway")
    folded_note = "(the UNet as loaded: time and class embedding added in every block, not folded into biases)"
    variants: list[tuple[str, Callable[[], float], str]] = [
        ("sequential fp32", lambda: run(paths, args.model, "fp32", False, out), ""),
        ("read-ahead fp32", lambda: run(paths, args.model, "fp32", True, out), ""),
    ]
    if bf16:
        variants += [("sequential bf16", lambda: run(paths, args.model, "bf16", False, out), ""),
                     ("read-ahead bf16", lambda: run(paths, args.model, "bf16", True, out), "")]
    if gzipio.ACCELERATED:
        variants.append(("seq. fp32, zlib", lambda: zlib_run(paths, args.model, out),
                         "(gzip by zlib instead of ISA-L)"))
    variants.append(("seq. fp32, plain", lambda: plain_run(paths, args.model, out),
                     "(MONAI resampling and hole filling, scipy median everywhere)"))
    variants.append(("seq. fp32, unfolded", lambda: run(paths, args.model, "fp32", False, out, args.contrast),
                     folded_note))
    if bf16:
        variants.append(("seq. bf16, unfolded", lambda: run(paths, args.model, "bf16", False, out, args.contrast),
                         folded_note))
    for other in args.compare:
        variants.append((f"{other} fp32", functools.partial(run, paths, other, "fp32", False, out),
                         f"(of {args.model}'s speed)"))
    run(paths[:1], args.model, "fp32", False, out)  # warm-up: first-call allocations and lazy imports
    times: dict[str, list[float]] = {label: [] for label, _, _ in variants}
    for r in range(max(1, args.rounds)):
        order = variants[r % len(variants):] + variants[:r % len(variants)]  # each round starts elsewhere
        for label, timed, _ in order:
            times[label].append(timed())
    base = float(np.median(times["sequential fp32"]))
    for label, _, note in variants:
        t = float(np.median(times[label]))
        print(f"{label:19s} {t:6.2f} s/brain   {base / t:4.2f}x {note}".rstrip())


def zlib_run(paths: list[Path], model_name: str, out: Path) -> float:
    """Sequential fp32 with the standard library's zlib in place of ISA-L."""
    isal, gzipio._isal_gzip = gzipio._isal_gzip, None
    try:
        return run(paths, model_name, "fp32", False, out)
    finally:
        gzipio._isal_gzip = isal


def plain_run(paths: list[Path], model_name: str, out: Path) -> float:
    """Sequential fp32 through the plain MONAI and scipy calls."""
    with plain_calls():
        return run(paths, model_name, "fp32", False, out)

if __name__ == "__main__":
    main()

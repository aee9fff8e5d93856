"""Dashboard responsiveness with a large run: page switches, scan switches and saving verdicts.

Fills a SQLite database with N scored scans (small NIfTI inputs, reconstructions, maps and masks
written to disk, findings and some reviews through the store API), plus a few full-size brains
(182x218x182), then drives the real app script with ``streamlit.testing.v1.AppTest`` and prints the
wall time of each script run (server-side work per interaction; the browser adds drawing time).

Usage: python benchmarks/dashboard_speed.py [--n 1000] [--shape 32] [--big 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "dashboard" / "app.py"


def _save(path: Path, data: np.ndarray, affine: np.ndarray, dtype: type = np.float32) -> str:
    image = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    nib.save(image, str(path))
    return str(path)


def fill(root: Path, n: int, size: int, big: int) -> tuple[str, int]:
    """A database with one calibrated run of ``n`` small scans and ``big`` full-size ones; returns (url, run id)."""
    from anomaly.store import (
        add_review,
        finish_run,
        get_or_create_model,
        get_or_create_scan,
        open_run,
        open_store,
        save_calibration,
        upsert_result,
    )

    rng = np.random.default_rng(0)
    out, inputs = root / "out", root / "inputs"
    out.mkdir(parents=True, exist_ok=True)
    inputs.mkdir(parents=True, exist_ok=True)
    url = "sqlite:///" + (root / "bench.db").as_posix()
    store = open_store(url)
    grid = np.stack(np.meshgrid(*[np.arange(size) - size / 2] * 3, indexing="ij"))
    brain = np.sqrt((grid**2).sum(0)) < size * 0.42
    affine = np.eye(4)
    affine[:3, 3] = -size / 2
    with store.session() as s:
        model = get_or_create_model(s, "bench-vae", "0" * 64)
        calibration = save_calibration(s, "bench", model, "healthy-fpr", 0.6, scan_threshold=0.35)
        run = open_run(s, model, {}, "1" * 64, out, calibration)
        for i in range(n + big):
            name = f"scan{i:04d}"
            if i < n:
                shape, aff, mask_brain = (size,) * 3, affine, brain
            else:  # a full-size 1 mm brain
                shape = (182, 218, 182)
                aff = np.diag([1.0, 1.0, 1.0, 1.0])
                aff[:3, 3] = [-91.0, -126.0, -72.0]
                g = np.stack(np.meshgrid(*[np.linspace(-1, 1, k) for k in shape], indexing="ij"))
                mask_brain = np.sqrt((g**2).sum(0)) < 0.85
            image = np.where(mask_brain, 100.0, 0.0) + mask_brain * rng.normal(0, 3, shape)
            residual = np.where(mask_brain, rng.gamma(2.0, 0.1, shape), 0.0)
            if i % 3 == 0:
                centre = np.array(shape) // 2 + rng.integers(-4, 5, 3)
                residual[tuple(slice(c - 2, c + 3) for c in centre)] += 0.8
            in_path = _save(inputs / f"{name}.nii.gz", image, aff)
            map_path = _save(out / f"{name}_anomaly.nii.gz", residual, aff)
            recon_path = _save(out / f"{name}_recon.nii.gz", np.where(mask_brain, 100.0, 0.0), aff)
            mask = residual >= 0.6
            mask_path = _save(out / f"{name}_mask.nii.gz", mask, aff, np.uint8)
            values = residual[mask_brain]
            score = float(np.sort(values)[-max(1, values.size // 100) :].mean())
            findings = []
            if mask.any():
                ijk = np.argwhere(mask)
                peak = ijk[int(np.argmax(residual[mask]))]
                findings.append(
                    {
                        "n_voxels": int(mask.sum()),
                        "volume_ml": float(mask.sum()) / 1000.0,
                        "centroid_mm": (aff @ np.r_[ijk.mean(0), 1.0])[:3],
                        "peak_mm": (aff @ np.r_[peak, 1.0])[:3],
                        "peak": float(residual[mask].max()),
                        "mean": float(residual[mask].mean()),
                        "region_centroid": None,
                        "region_majority": None,
                        "atlas": None,
                    }
                )
            digest = hashlib.sha256(f"{name}-{i}".encode()).hexdigest()
            scan = get_or_create_scan(s, digest, in_path, name, shape, (1.0, 1.0, 1.0), "RAS", "float32")
            if i % 50 == 7:
                upsert_result(
                    s, run, scan, status="failed", input_path=in_path, error=f"{in_path}: damaged file"
                )
                continue
            result = upsert_result(
                s,
                run,
                scan,
                status="ok",
                input_path=in_path,
                score=score,
                flagged=score >= 0.35,
                map_path=map_path,
                recon_path=recon_path,
                mask_path=mask_path,
                timing_s=6.5,
                findings=findings,
            )
            if i % 4 == 1:
                s.flush()
                add_review(s, result.id, "reader", "normal" if i % 8 == 1 else "confirmed finding")
        finish_run(s, run)
        run_id = run.id
    store.close()
    return url, run_id


def clear_cached_volumes() -> None:
    """Forget every cached volume (as a server restart would)."""
    import streamlit as st

    st.cache_resource.clear()


def timed(label: str, times: dict[str, list[float]], action: Callable[[], object]) -> None:
    start = time.perf_counter()
    at = action()
    times.setdefault(label, []).append(time.perf_counter() - start)
    exceptions = getattr(at, "exception", None)
    if exceptions:
        raise SystemExit(f"{label}: the app raised {[e.value for e in exceptions]}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1000, help="small scored scans in the run (default 1000)")
    parser.add_argument(
        "--shape", type=int, default=32, help="edge of the small volumes in voxels (default 32)"
    )
    parser.add_argument("--big", type=int, default=3, help="full-size 182x218x182 brains added (default 3)")
    parser.add_argument("--keep", type=Path, help="build the database in this folder and keep it")
    args = parser.parse_args()

    if args.keep is None:
        with tempfile.TemporaryDirectory(prefix="dashboard-bench-") as tmp:
            measure(Path(tmp), args)
    else:
        args.keep.mkdir(parents=True, exist_ok=True)
        measure(args.keep, args)


def measure(root: Path, args: argparse.Namespace) -> None:
    """Fill a database under ``root`` and time the interactions."""
    t0 = time.perf_counter()
    url, run_id = fill(root, args.n, args.shape, args.big)
    print(f"filled {args.n} + {args.big} scans in {time.perf_counter() - t0:.1f} s ({url})")

    os.environ["ANOMALY_DB"] = url
    sys.path.insert(0, str(REPO))
    from streamlit.testing.v1 import AppTest

    from anomaly.store import neighbours, open_store, run_results

    store = open_store(url)
    with store.session() as s:
        ordered = [r.result_id for r in run_results(s, run_id, status="ok", order="score_desc")]
        by_id = [r.result_id for r in run_results(s, run_id, status="ok", order="id")]
        big_ids = by_id[-args.big :] if args.big else []
        before_big = {b: neighbours(s, run_id, b, "score_desc")[0] for b in big_ids}
    store.close()

    times: dict[str, list[float]] = {}
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.query_params["run"] = str(run_id)
    timed("first load (Runs page, cold process)", times, at.run)
    pages = ["Worklist", "Viewer", "Calibration", "Export", "Runs"]
    for _ in range(3):
        for page in pages:
            timed(f"switch to {page}", times, lambda p=page: at.sidebar.radio[0].set_value(p).run())
    at.sidebar.radio[0].set_value("Viewer").run()
    for _ in range(25):
        timed("next scan", times, lambda: at.button(key="vw_next").click().run())
    for _ in range(25):
        timed("previous scan (cached)", times, lambda: at.button(key="vw_prev").click().run())
    for _ in range(10):
        timed(
            "move a slice slider",
            times,
            lambda: at.slider(key="vw_z").set_value((at.slider(key="vw_z").value + 1) % args.shape).run(),
        )
        timed("move the threshold", times, lambda: at.slider(key="vw_threshold").set_value(0.7).run())
    at.sidebar.text_input[0].input("bench").run()
    for _ in range(10):

        def save() -> object:
            at.radio(key="rv_verdict").set_value("normal")
            next(b for b in at.button if b.label == "Save & next").click()
            return at.run()

        timed("save verdict and open next", times, save)
    for result_id in big_ids:
        at.session_state["result_id"] = result_id
        timed("open a 182x218x182 brain (not cached)", times, at.run)
        timed("same brain, move a slider (cached)", times, lambda: at.slider(key="vw_x").set_value(90).run())
    clear_cached_volumes()  # the brains must be read again, this time ahead of time
    for previous in before_big.values():
        if previous is None:
            continue
        at.session_state["result_id"] = previous
        at.run()
        time.sleep(3.0)  # a reviewer looks at the scan; the next one is read in the background meanwhile
        timed(
            "next onto a 182x218x182 brain (prefetched)",
            times,
            lambda: at.button(key="vw_next").click().run(),
        )
    at.sidebar.radio[0].set_value("Worklist").run()
    for query in ("scan01", "scan0999", ""):
        timed("worklist search", times, lambda q=query: at.text_input(key="wl_search").input(q).run())
    timed(
        "worklist filter unreviewed",
        times,
        lambda: at.selectbox(key="wl_verdict").set_value("unreviewed").run(),
    )

    print(
        f"\n{len(ordered)} scored scans in run {run_id}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(f"{'interaction':44s} {'n':>3s} {'median ms':>10s} {'max ms':>8s}")
    for label, values in times.items():
        print(
            f"{label:44s} {len(values):3d} {1000 * statistics.median(values):10.0f} {1000 * max(values):8.0f}"
        )
    slowest = max((max(v), k) for k, v in times.items() if not k.startswith("first load"))
    print(f"\nslowest interaction after the first load: {slowest[1]} at {1000 * slowest[0]:.0f} ms")


if __name__ == "__main__":
    main()

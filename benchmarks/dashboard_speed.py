"""Dashboard responsiveness with a large run: page switches, scan switches and saving verdicts.

Fills a database (SQLite, or PostgreSQL with ``--backend postgresql``) with one calibrated run of N
scored scans, inserted in bulk (executemany batches through ``anomaly.store.bulk``): every scan's
result points at one of a pool of small NIfTI volumes (input, map, reconstruction, mask), a third have a
finding, a quarter a review, every 50th failed; plus a few full-size 182x218x182 brains with files of
their own. Then drives the real app script with ``streamlit.testing.v1.AppTest`` in a fresh process and
prints each interaction's median and worst wall time (server-side work; the browser adds drawing time),
the same for the CPU time the process spent (less disturbed by other jobs on the machine), and that
process's peak resident memory (the server's, as ``streamlit run`` would hold it).

PostgreSQL: ``--pg-url URL`` (a database it may fill; or ``$ANOMALY_TEST_PG_URL``); without one it
starts a throwaway server with ``scripts/start_test_postgres.sh`` and stops it afterwards. The filled
database is vacuumed and analysed before the timing (autovacuum's work on a live database).

Usage: python benchmarks/dashboard_speed.py [--n 1000] [--backend sqlite|postgresql] [--pg-url URL]
       [--shape 32] [--big 3] [--pool 50] [--json FILE] [--keep DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "dashboard" / "app.py"
CHUNK = 10_000


def _save(path: Path, data: np.ndarray, affine: np.ndarray, dtype: type = np.float32) -> str:
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=dtype), affine), str(path))
    return str(path)


def volumes(root: Path, shape: tuple[int, int, int], rng: np.random.Generator, name: str,
            affine: np.ndarray) -> dict[str, Any]:
    """One scan's files (input, map, reconstruction, mask) under ``root`` and its score and finding."""
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, k) for k in shape], indexing="ij"))
    brain = np.sqrt((g**2).sum(0)) < 0.85
    image = np.where(brain, 100.0, 0.0) + brain * rng.normal(0, 3, shape)
    residual = np.where(brain, rng.gamma(2.0, 0.1, shape), 0.0)
    centre = np.array(shape) // 2 + rng.integers(-2, 3, 3)
    residual[tuple(slice(c - 2, c + 3) for c in centre)] += 0.8
    mask = residual >= 0.6
    ijk = np.argwhere(mask)
    peak = ijk[int(np.argmax(residual[mask]))]
    finding = {"rank": 1, "n_voxels": int(mask.sum()), "volume_ml": float(mask.sum()) / 1000.0,
               "peak": float(residual[mask].max()), "mean": float(residual[mask].mean()),
               **dict(zip(("centroid_x", "centroid_y", "centroid_z"), (affine @ np.r_[ijk.mean(0), 1.0])[:3], strict=True)),
               **dict(zip(("peak_x", "peak_y", "peak_z"), (affine @ np.r_[peak, 1.0])[:3], strict=True))}
    return {
        "input": _save(root / "inputs" / f"{name}.nii.gz", image, affine),
        "map": _save(root / "out" / f"{name}_anomaly.nii.gz", residual, affine),
        "recon": _save(root / "out" / f"{name}_recon.nii.gz", np.where(brain, 100.0, 0.0), affine),
        "mask": _save(root / "out" / f"{name}_mask.nii.gz", mask, affine, np.uint8),
        "finding": {k: float(v) if k not in ("rank", "n_voxels") else v for k, v in finding.items()},
    }


def fill(url: str, root: Path, n: int, size: int, big: int, pool: int) -> int:
    """One calibrated run of ``n`` small scans (files shared from a pool) and ``big`` full-size ones; returns its id."""
    import anomaly.store as st
    from anomaly.store import bulk

    rng = np.random.default_rng(0)
    for folder in ("out", "inputs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    small_affine = np.eye(4)
    small_affine[:3, 3] = -size / 2
    big_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    big_affine[:3, 3] = [-91.0, -126.0, -72.0]
    shared = [volumes(root, (size,) * 3, rng, f"pool{k:03d}", small_affine) for k in range(pool)]
    brains = [volumes(root, (182, 218, 182), rng, f"brain{k}", big_affine) for k in range(big)]
    store = st.open_store(url)
    with store.session() as s:
        model = st.get_or_create_model(s, "bench-vae", "0" * 64)
        calibration = st.save_calibration(s, "bench", model, "healthy-fpr", 0.6, scan_threshold=0.35)
        run = st.open_run(s, model, {}, "1" * 64, root / "out", calibration)
        run_id = run.id
    now = st.utcnow()
    scores = rng.gamma(4.0, 0.08, n + big)
    for start in range(0, n + big, CHUNK):
        stop = min(start + CHUNK, n + big)
        with store.session() as s:
            names = [f"scan{i:06d}" if i < n else f"brain{i - n}" for i in range(start, stop)]
            files = [shared[i % pool] if i < n else brains[i - n] for i in range(start, stop)]
            hashes = [hashlib.sha256(f"{name}-{i}".encode()).hexdigest() for i, name in zip(range(start, stop), names, strict=True)]
            scan_ids = bulk.add_scans(s, [
                {"content_hash": h, "path": f["input"], "name": name, "shape": [size] * 3, "spacing": [1.0] * 3,
                 "orientation": "RAS", "dtype": "float32", "created_at": now}
                for h, name, f in zip(hashes, names, files, strict=True)])
            rows = []
            for i, h, f in zip(range(start, stop), hashes, files, strict=True):
                failed = i % 50 == 7 and i < n
                score = float(scores[i])
                rows.append({"scan_id": scan_ids[h], "input_path": f["input"], "status": "failed" if failed else "ok",
                             "error": f"{f['input']}: damaged file" if failed else None,
                             "score": None if failed else score, "flagged": None if failed else score >= 0.35,
                             "map_path": None if failed else f["map"], "recon_path": None if failed else f["recon"],
                             "mask_path": None if failed else f["mask"], "timing_s": 6.5, "created_at": now,
                             "updated_at": now + timedelta(microseconds=i)})
            ids = bulk.add_results(s, run_id, rows)
            result_ids = [ids[scan_ids[h]] for h in hashes]
            bulk.add_findings(s, [{"result_id": rid, **f["finding"]} for i, rid, f in
                                  zip(range(start, stop), result_ids, files, strict=True) if i % 3 == 0 or i >= n])
            bulk.add_reviews(s, [{"result_id": rid, "reviewer": "reader", "note": "", "created_at": now,
                                  "verdict": "normal" if i % 8 == 1 else "confirmed finding"}
                                 for i, rid in zip(range(start, stop), result_ids, strict=True) if i % 4 == 1 and i % 50 != 7])
    with store.session() as s:
        st.refresh_run(s, run_id)
        st.finish_run(s, run_id)
    if store.engine.dialect.name == "postgresql":
        # refresh_run has just rewritten every result: vacuum and gather statistics, as autovacuum does on a
        # live database within a minute (stale statistics would have the planner misjudge the search)
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    store.close()
    return run_id


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(label: str, times: dict[str, list[float]], action: Callable[[], object]) -> None:
    """Run ``action`` and record its wall time, and (under ``cpu:``) the CPU time of this process meanwhile,
    which other jobs on the machine disturb less."""
    start, cpu = time.perf_counter(), time.process_time()
    at = action()
    times.setdefault(label, []).append(time.perf_counter() - start)
    times.setdefault("cpu:" + label, []).append(time.process_time() - cpu)
    exceptions = getattr(at, "exception", None)
    if exceptions:
        raise SystemExit(f"{label}: the app raised {[e.value for e in exceptions]}")


def drive(url: str, run_id: int, n: int, big: int, shape: int) -> dict[str, Any]:
    """Time the interactions against a filled database (in this process, which plays the server)."""
    os.environ["ANOMALY_DB"] = url
    sys.path.insert(0, str(REPO))
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from anomaly.store import neighbours, open_store, result_page

    store = open_store(url)
    with store.session() as s:
        big_ids = [r.result_id for r in result_page(s, run_id, order="recent", size=big).rows] if big else []
        before_big = {b: neighbours(s, run_id, b, "score_desc")[0] for b in big_ids}
    store.close()

    times: dict[str, list[float]] = {}
    at = AppTest.from_file(str(APP), default_timeout=300)
    at.query_params["run"] = str(run_id)
    timed("first load (Runs page, cold process)", times, at.run)
    for _ in range(3):
        for page in ["Worklist", "Viewer", "Calibration", "Export", "Runs"]:
            timed(f"switch to {page}", times, lambda p=page: at.sidebar.radio[0].set_value(p).run())
    at.sidebar.radio[0].set_value("Worklist").run()
    for _ in range(5):
        timed("worklist next page", times, lambda: at.button(key="wl_next_page").click().run())
    at.sidebar.radio[0].set_value("Viewer").run()
    for _ in range(25):
        timed("next scan", times, lambda: at.button(key="vw_next").click().run())
    for _ in range(25):
        timed("previous scan (cached)", times, lambda: at.button(key="vw_prev").click().run())
    for _ in range(10):
        timed("move a slice slider", times,
              lambda: at.slider(key="vw_z").set_value((at.slider(key="vw_z").value + 1) % shape).run())
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
    st.cache_resource.clear()  # the brains must be read again, this time ahead of time
    st.cache_resource.clear()
    for previous in before_big.values():
        if previous is None:
            continue
        at.session_state["result_id"] = previous
        at.run()
        time.sleep(3.0)  # a reviewer looks at the scan; the next one is read in the background meanwhile
        timed("next onto a 182x218x182 brain (prefetched)", times, lambda: at.button(key="vw_next").click().run())
    at.sidebar.radio[0].set_value("Worklist").run()
    for query in ("scan01", f"scan{n - 1:06d}", ""):
        timed("worklist search", times, lambda q=query: at.text_input(key="wl_search").input(q).run())
    timed("worklist filter unreviewed", times, lambda: at.selectbox(key="wl_verdict").set_value("unreviewed").run())
    return {"times": times, "peak_rss_mb": peak_rss_mb()}


@contextmanager
def postgres(url: str | None) -> Iterator[str]:
    """A fresh database on the given server (or on a throwaway one started here), dropped afterwards."""
    from anomaly.store.scratch import scratch_database

    started = None
    if not url:
        folder = tempfile.mkdtemp(prefix="anomaly-pg-bench-")
        env = dict(os.environ, PGTEST_DIR=folder)
        url = subprocess.run(["bash", str(REPO / "scripts" / "start_test_postgres.sh")], env=env, check=True,
                             capture_output=True, text=True).stdout.strip()
        started = folder
    try:
        with scratch_database(url, "anomaly_bench") as database:
            yield database
    finally:
        if started:
            subprocess.run(["bash", str(REPO / "scripts" / "start_test_postgres.sh"), "stop", started],
                           check=False, capture_output=True)


def report(args: argparse.Namespace, result: dict[str, Any], fill_s: float) -> dict[str, Any]:
    times: dict[str, list[float]] = result["times"]
    rows = {label: {"n": len(v), "median_ms": 1000 * statistics.median(v), "worst_ms": 1000 * max(v),
                    "cpu_median_ms": 1000 * statistics.median(times["cpu:" + label]),
                    "cpu_worst_ms": 1000 * max(times["cpu:" + label])}
            for label, v in times.items() if not label.startswith("cpu:")}
    print(f"\n{args.n} scans ({args.backend}), filled in {fill_s:.0f} s; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")
    print(f"{'interaction':44s} {'n':>3s} {'median ms':>10s} {'worst ms':>9s} {'CPU median':>11s} {'CPU worst':>10s}")
    for label, row in rows.items():
        print(f"{label:44s} {row['n']:3d} {row['median_ms']:10.0f} {row['worst_ms']:9.0f} "
              f"{row['cpu_median_ms']:11.0f} {row['cpu_worst_ms']:10.0f}")
    print(f"peak memory of the server process: {result['peak_rss_mb']:.0f} MB")
    return {"n": args.n, "backend": args.backend, "fill_s": fill_s, "peak_rss_mb": result["peak_rss_mb"],
            "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "interactions": rows}


def measure(root: Path, args: argparse.Namespace, url: str) -> None:
    """Fill a database under ``root`` (SQLite) or at ``url`` and time the interactions in a child process."""
    sys.path.insert(0, str(REPO))
    t0 = time.perf_counter()
    run_id = fill(url, root, args.n, args.shape, args.big, args.pool)
    fill_s = time.perf_counter() - t0
    print(f"filled {args.n} + {args.big} scans in {fill_s:.1f} s")
    child = subprocess.run([sys.executable, __file__, "--drive", url, str(run_id), str(args.n), str(args.big),
                            str(args.shape)], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    if child.returncode:
        raise SystemExit(f"the measuring process failed:\n{child.stderr[-3000:]}")
    summary = report(args, json.loads(child.stdout.strip().splitlines()[-1]), fill_s)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="small scored scans in the run (default 1000)")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--pg-url", default=os.environ.get("ANOMALY_TEST_PG_URL", ""),
                        help="PostgreSQL server to create a database on (default: $ANOMALY_TEST_PG_URL, else start one)")
    parser.add_argument("--shape", type=int, default=32, help="edge of the small volumes in voxels (default 32)")
    parser.add_argument("--big", type=int, default=3, help="full-size 182x218x182 brains added (default 3)")
    parser.add_argument("--pool", type=int, default=50, help="distinct small volumes the scans share (default 50)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--keep", type=Path, help="build the files (and the SQLite database) in this folder")
    parser.add_argument("--drive", nargs=5, metavar=("URL", "RUN", "N", "BIG", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        url, run_id, n, big, shape = args.drive
        print(json.dumps(drive(url, int(run_id), int(n), int(big), int(shape))))
        return
    with tempfile.TemporaryDirectory(prefix="dashboard-bench-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        if args.backend == "sqlite":
            measure(root, args, "sqlite:///" + (root / "bench.db").as_posix())
        else:
            with postgres(args.pg_url) as url:
                measure(root, args, url)


if __name__ == "__main__":
    main()

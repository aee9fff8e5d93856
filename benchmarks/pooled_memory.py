"""Peak memory of `anomaly export` at many results, and of evaluation and calibration over many small maps.

Export: fills SQLite databases of ``--export-small`` and ``--export-n`` results with the builder of
``benchmarks/dashboard_speed.py`` and runs ``anomaly export`` on each (rows streamed in batches); for
contrast it also reads the large one as a list (``results_table``), which is what streaming avoids.

Evaluation and calibration: ``--n`` and ``4 * --n`` synthetic scored scans (``tests/eval_fixture.py``:
``--size``^3 maps with brain masks and lesion labels), each evaluated and calibrated (healthy and
labelled, 1000 bootstrap draws) with every pooled value held (exact: the behaviour up to the cap, and for every size before
the cap existed) and with ``--cap`` values at most (binned past it).

Each figure is the peak of memory traced by ``tracemalloc`` (Python objects and numpy arrays) during
that step alone, and its ratio to the step's baseline measured in the same process (the small export,
the exact run at ``--n`` scans). The process's peak resident memory is printed at the end.

Usage: python benchmarks/pooled_memory.py [--n 250] [--size 48] [--cap 1000000] [--export-n 100000]
       [--export-small 1000] [--skip-export] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import resource
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HUGE = 1 << 62
"""A cap no run reaches: every pooled value held (exact)."""


def traced_peak_mb(action: Callable[[], Any]) -> float:
    """Peak traced memory (MB) while ``action`` runs, above what was traced before it."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        with contextlib.redirect_stdout(io.StringIO()):
            action()
        return (tracemalloc.get_traced_memory()[1] - before) / 2**20
    finally:
        tracemalloc.stop()


def export_figures(root: Path, small: int, large: int) -> list[tuple[str, float, str]]:
    """Peak memory of ``anomaly export`` at ``small`` and ``large`` results, and of a list read at ``large``."""
    import anomaly.store as st
    from benchmarks.dashboard_speed import fill
    from pipelines.cli import main

    urls = {}
    for n in (small, large):
        (root / f"export{n}").mkdir(parents=True, exist_ok=True)
        urls[n] = f"sqlite:///{root / f'export{n}' / 'r.db'}"
        t0 = time.perf_counter()
        fill(urls[n], root / f"export{n}", n, 16, 0, 20)
        print(f"filled {n:,} results in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    with contextlib.redirect_stdout(io.StringIO()):  # warm-up: first imports are not the export's memory
        main(["export", "--db", urls[small], "--csv", str(root / "warm-up.csv")])
    rows = []
    for n in (small, large):
        peak = traced_peak_mb(lambda n=n: main(["export", "--db", urls[n], "--csv", str(root / f"all{n}.csv")]))
        rows.append((f"anomaly export, {n:,} results (streamed)", peak, "export"))

    def as_list() -> None:
        store = st.open_store(urls[large])
        with store.session() as s:
            st.results_table(s, None)
        store.close()

    rows.append((f"results as one list, {large:,} results (for contrast)", traced_peak_mb(as_list), "export"))
    return rows


def steps(out: Path, run: tuple[str, int, Path], count: int, size: int, limit: int) -> dict[str, Callable[[], Any]]:
    """Evaluation and both calibrations of ``count`` synthetic scans with at most ``limit`` pooled values held."""
    from anomaly import calibration as C
    from anomaly.store import open_store
    from pipelines.calibrate import LazySequence
    from pipelines.evaluate import evaluate_run
    from tests.eval_fixture import synthetic_scan

    maps = LazySequence(count, lambda i: synthetic_scan(i, size).amap)  # made one at a time, as maps are read
    masks = LazySequence(count, lambda i: synthetic_scan(i, size).brain)
    truth = LazySequence(count, lambda i: synthetic_scan(i, size).label)

    def evaluate() -> None:
        store = open_store(run[0])
        try:
            evaluate_run(store, run[1], run[2], out, healthy_without_labels=True, progress=False, exact_cap=limit)
        finally:
            store.close()

    return {
        "evaluate": evaluate,
        "calibrate healthy": lambda: C.calibrate_healthy(maps, masks, [0.0] * count, 0.01, n_bootstrap=1000,
                                                         exact_cap=limit),
        "calibrate labelled": lambda: C.calibrate_labelled(maps, masks, truth, exact_cap=limit),
    }


def evaluation_figures(root: Path, n: int, size: int, cap: int) -> list[tuple[str, float, str]]:
    """Peak memory of evaluation and both calibrations at ``n`` and ``4 n`` scans, exact and capped."""
    from tests.eval_fixture import scored_run

    with contextlib.suppress(ImportError):  # imported before measuring: the plots' library is not pooled memory
        import matplotlib.pyplot  # noqa: F401

        import anomaly.plots  # noqa: F401
    rows = []
    for count in (n, 4 * n):
        t0 = time.perf_counter()
        run = scored_run(root / f"eval{count}", count, size=size)
        print(f"wrote {count} scored scans in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for label, limit in (("exact", HUGE), (f"cap {cap:,}", cap)):
            for what, action in steps(root / f"out{count}-{limit}", run, count, size, limit).items():
                t0 = time.perf_counter()
                peak = traced_peak_mb(action)
                print(f"{what} {label} {count}: {peak:.1f} MB, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
                rows.append((f"{what}, {count} scans, {label}", peak, what))
    return rows


def report(rows: list[tuple[str, float, str]]) -> None:
    """One line per step with its ratio to the first step of its group (the baseline)."""
    baseline: dict[str, float] = {}
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}")
    print(f"{'step':58s} {'peak MB':>9s} {'x baseline':>11s}")
    for label, peak, group in rows:
        base = baseline.setdefault(group, peak)
        print(f"{label:58s} {peak:9.1f} {peak / base if base else float('nan'):11.2f}")
    print(f"peak resident memory of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=250, help="scans of the smaller evaluation set (default 250)")
    parser.add_argument("--size", type=int, default=48, help="edge of the synthetic maps in voxels (default 48)")
    parser.add_argument("--cap", type=int, default=1_000_000, help="pooled values held at most (default 1,000,000)")
    parser.add_argument("--export-n", type=int, default=100_000, help="results of the large export (default 100,000)")
    parser.add_argument("--export-small", type=int, default=1000, help="results of the baseline export (default 1000)")
    parser.add_argument("--skip-export", action="store_true", help="measure evaluation and calibration only")
    parser.add_argument("--keep", type=Path, help="build the files and databases in this folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pooled-bench-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        rows = [] if args.skip_export else export_figures(root, args.export_small, args.export_n)
        rows += evaluation_figures(root, args.n, args.size, args.cap)
    report(rows)


if __name__ == "__main__":
    main()

"""Executors run per-scan work and yield outcomes in input order; the driver records them."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from anomaly.config import ScoringSettings
from anomaly.models.base import SliceModel
from pipelines.work import AppliedCalibration, Loaded, ScanOutcome, ScanTask, finish_scan, load_and_prepare


class Executor(Protocol):
    """Anything that turns tasks into outcomes, in any order (local threads, a Dask cluster)."""

    name: str

    def map(self, tasks: Iterable[ScanTask], model: SliceModel, settings: ScoringSettings,
            calibration: AppliedCalibration | None = None, atlas: Any = None) -> Iterator[ScanOutcome]: ...


class LocalExecutor:
    """One process: reader threads load and preprocess the next scans while the model works on this one."""

    name = "local"

    def __init__(self, prefetch: int = 2, readers: int = 1) -> None:
        self.prefetch = max(1, prefetch)
        self.readers = max(1, readers)

    def map(self, tasks: Iterable[ScanTask], model: SliceModel, settings: ScoringSettings,
            calibration: AppliedCalibration | None = None, atlas: Any = None) -> Iterator[ScanOutcome]:
        pending: deque[Future[Loaded]] = deque()
        source = iter(tasks)
        with ThreadPoolExecutor(self.readers, thread_name_prefix="anomaly-reader") as pool:
            def submit_next() -> None:
                task = next(source, None)
                if task is not None:
                    pending.append(pool.submit(load_and_prepare, task, model, settings))

            for _ in range(self.prefetch):
                submit_next()
            while pending:
                loaded = pending.popleft().result()
                submit_next()
                yield finish_scan(loaded, model, settings, calibration, atlas)

"""Executors run per-scan work and yield outcomes in input order; the driver records them."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from anomaly.calibration import Calibration
from anomaly.config import ScoringSettings
from anomaly.models.base import SliceModel
from pipelines.work import Loaded, ScanOutcome, ScanTask, finish_scan, load_and_prepare


class Executor(Protocol):
    """Anything that turns tasks into outcomes, in any order (local threads, a Dask cluster)."""

    name: str

    def map(self, tasks: Iterable[ScanTask], model: SliceModel, settings: ScoringSettings,
            calibration: Calibration | None = None, atlas: Any = None) -> Iterator[ScanOutcome]: ...


class LocalExecutor:
    """One process: a reader thread loads and preprocesses the next scans while the model works on this
    one. ``prefetch=None`` reads ahead only where it pays: a GPU model, or a CPU model with more than four
    cores (on two cores the reader competes with the model's threads and costs about 10 %)."""

    name = "local"

    def __init__(self, prefetch: int | None = None, readers: int = 1) -> None:
        self.prefetch = prefetch
        self.readers = max(1, readers)

    def read_ahead(self, model: SliceModel) -> int:
        if self.prefetch is not None:
            return max(0, self.prefetch)
        return 2 if model.device.type != "cpu" or (os.cpu_count() or 1) > 4 else 0

    def map(self, tasks: Iterable[ScanTask], model: SliceModel, settings: ScoringSettings,
            calibration: Calibration | None = None, atlas: Any = None) -> Iterator[ScanOutcome]:
        ahead = self.read_ahead(model)
        if ahead == 0:
            for task in tasks:
                yield finish_scan(load_and_prepare(task, model, settings), model, settings, calibration, atlas)
            return
        pending: deque[Future[Loaded]] = deque()
        source = iter(tasks)
        with ThreadPoolExecutor(self.readers, thread_name_prefix="anomaly-reader") as pool:
            def submit_next() -> None:
                task = next(source, None)
                if task is not None:
                    pending.append(pool.submit(load_and_prepare, task, model, settings))

            for _ in range(ahead):
                submit_next()
            while pending:
                loaded = pending.popleft().result()
                submit_next()
                yield finish_scan(loaded, model, settings, calibration, atlas)

"""Scoring on a Dask cluster: workers run :func:`pipelines.work.score_scan` and write the maps (to a
folder every worker can reach); the driver records each outcome in the database as it arrives."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from anomaly.calibration import Calibration
from anomaly.config import ScoringSettings
from anomaly.models.base import SliceModel
from pipelines.work import ScanOutcome, ScanTask, score_scan


def _score_with_threads(task: ScanTask, model: SliceModel, settings: ScoringSettings,
                        calibration: Calibration | None, atlas: Any, threads: int) -> ScanOutcome:
    import torch

    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return score_scan(task, model, settings, calibration, atlas)


class DaskExecutor:
    """Runs scans on a Dask cluster: ``address`` of a running scheduler, or a local cluster of
    ``n_workers`` processes. The model is sent to every worker once; at most ``window`` scans are in
    flight so a large batch never floods the scheduler. Outcomes arrive in completion order."""

    name = "dask"

    def __init__(self, address: str | None = None, n_workers: int = 2, threads_per_worker: int = 1,
                 window: int | None = None) -> None:
        self.address = address
        self.n_workers = n_workers
        self.threads_per_worker = threads_per_worker
        self.window = window

    def _client(self) -> Any:
        try:
            from distributed import Client, LocalCluster
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError("Dask is not installed: pip install 'brain-anomaly[distributed]'") from exc
        if self.address:
            return Client(self.address), None
        cluster = LocalCluster(n_workers=self.n_workers, threads_per_worker=self.threads_per_worker,
                               processes=True, dashboard_address=None)
        return Client(cluster), cluster

    def map(self, tasks: Iterable[ScanTask], model: SliceModel, settings: ScoringSettings,
            calibration: Calibration | None = None, atlas: Any = None) -> Iterator[ScanOutcome]:
        from distributed import as_completed

        client, cluster = self._client()
        try:
            n = max(1, len(client.scheduler_info().get("workers", {})) or self.n_workers)
            window = self.window or 2 * n
            model_ref = client.scatter(model, broadcast=True)
            atlas_ref = client.scatter(atlas, broadcast=True) if atlas is not None else None
            source = iter(tasks)
            task_of: dict[str, ScanTask] = {}

            def submit(task: ScanTask) -> Any:
                future = client.submit(_score_with_threads, task, model_ref, settings, calibration, atlas_ref,
                                       self.threads_per_worker, pure=False)
                task_of[future.key] = task
                return future

            running = as_completed([submit(t) for _, t in zip(range(window), source, strict=False)])
            for future in running:
                try:
                    outcome = future.result()
                except Exception as exc:  # noqa: BLE001 - a lost worker fails one scan, not the batch
                    task = task_of[future.key]
                    outcome = ScanOutcome(task, "failed", error=f"{task.path}: worker failed: {exc!r}; "
                                                                "run the batch again to retry this scan")
                task_of.pop(future.key, None)
                yield outcome
                following = next(source, None)
                if following is not None:
                    running.add(submit(following))
        finally:
            client.close()
            if cluster is not None:
                cluster.close()


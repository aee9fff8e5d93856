"""A filled result database for the dashboard tests: small NIfTI inputs, reconstructions, anomaly maps,
masks and labels written to disk, and runs, results, findings and a calibration inserted through the
store API exactly as a scoring run records them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from sqlalchemy import select

from anomaly.store import (
    Result,
    finish_run,
    get_or_create_model,
    get_or_create_scan,
    open_run,
    open_store,
    run_results,
    save_calibration,
    upsert_result,
)

VOXEL_THRESHOLD = 0.5
SCAN_THRESHOLD = 0.2


@dataclass
class FilledDB:
    """Where the test database and its files are, and the ids a test needs."""

    url: str
    root: Path
    out_dir: Path
    run_id: int
    other_run_id: int
    ok_ids: list[int] = field(default_factory=list)
    """Scored results of the main run, highest score first."""
    failed_id: int = 0
    lesion_centre_mm: dict[int, tuple[float, float, float]] = field(default_factory=dict)


def _save(path: Path, data: np.ndarray, affine: np.ndarray, dtype: type = np.float32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=dtype), affine), str(path))
    return path


def _scan(
    shape: tuple[int, int, int], seed: int, lesion_at: tuple[int, int, int] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(input, reconstruction, anomaly map, lesion mask) of a ball 'brain' with an optional bright lesion."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) - n / 2 + 0.5 for n in shape], indexing="ij"))
    brain = np.sqrt((grid**2).sum(0)) < min(shape) * 0.42
    image = np.where(brain, 100.0, 0.0) + brain * rng.normal(0, 2, size=shape)
    image[brain & (np.abs(grid[0]) < 3)] = 60.0  # a dark midline structure so planes are recognisable
    lesion = np.zeros(shape, dtype=bool)
    if lesion_at is not None:
        centre = np.array(lesion_at).reshape(3, 1, 1, 1)
        index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
        lesion = np.sqrt(((index - centre) ** 2).sum(0)) <= 4
    recon = image.copy()
    image[lesion] = 180.0
    residual = np.abs(image - recon) / 100.0 + brain * rng.uniform(0, 0.1, size=shape)
    residual = np.where(brain, residual, 0.0)
    return image.astype(np.float32), recon.astype(np.float32), residual.astype(np.float32), lesion


def _finding(values: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> dict[str, object]:
    ijk = np.argwhere(mask)
    peak_index = ijk[int(np.argmax(values[mask]))]
    centroid = (affine @ np.r_[ijk.mean(0), 1.0])[:3]
    peak_mm = (affine @ np.r_[peak_index, 1.0])[:3]
    return {
        "rank": 1,
        "n_voxels": int(mask.sum()),
        "volume_ml": float(mask.sum()) * 0.001,
        "centroid_mm": centroid.tolist(),
        "peak_mm": peak_mm.tolist(),
        "peak": float(values[mask].max()),
        "mean": float(values[mask].mean()),
        "region_centroid": "Right Putamen",
        "region_majority": "Right Putamen",
        "atlas": "test-atlas",
    }


def build_filled_db(root: Path, n_ok: int = 4, shape: tuple[int, int, int] = (48, 48, 48)) -> FilledDB:
    """A calibrated run with ``n_ok`` scored scans (even ones with a lesion, the first two labelled) and one
    failed scan, plus a second uncalibrated run with one scan. Affines alternate RAS and LAS."""
    root = Path(root)
    url = "sqlite:///" + (root / "db" / "anomaly.db").as_posix()
    out_dir = root / "out"
    inputs = root / "inputs"
    store = open_store(url)
    info = FilledDB(url=url, root=root, out_dir=out_dir, run_id=0, other_run_id=0)
    with store.session() as s:
        model = get_or_create_model(s, "tiny-vae", "f" * 64, {"slice_size": 64})
        calibration = save_calibration(
            s,
            "healthy",
            model,
            "healthy-fpr",
            VOXEL_THRESHOLD,
            scan_threshold=SCAN_THRESHOLD,
            target_fpr=0.01,
        )
        run = open_run(s, model, {"batch_size": 4}, "a" * 64, out_dir, calibration)
        other = open_run(s, model, {"batch_size": 4}, "b" * 64, root / "out2")
        info.run_id, info.other_run_id = run.id, other.id
        for i in range(n_ok):
            affine = np.diag([-1.0 if i % 2 else 1.0, 1.0, 1.0, 1.0])
            affine[:3, 3] = [24.0 if i % 2 else -24.0, -24.0, -24.0]
            lesion_at = (34, 30, 20) if i % 2 == 0 else None
            image, recon, residual, lesion = _scan(shape, i, lesion_at)
            name = f"patient{i:02d}"
            in_path = _save(inputs / f"{name}.nii.gz", image, affine)
            map_path = _save(out_dir / f"{name}_anomaly.nii.gz", residual, affine)
            recon_path = _save(out_dir / f"{name}_recon.nii.gz", recon, affine)
            mask = residual >= VOXEL_THRESHOLD
            mask_path = _save(out_dir / f"{name}_mask.nii.gz", mask, affine, np.uint8)
            _save(out_dir / f"{name}_brain.nii.gz", image > 30, affine, np.uint8)
            details: dict[str, object] = {"warnings": []}
            if i < 2:
                details["label_path"] = str(
                    _save(root / "labels" / f"{name}_label.nii.gz", lesion, affine, np.uint8)
                )
            values = residual[residual > 0]
            score = float(np.sort(values)[-max(1, values.size // 100) :].mean())
            digest = hashlib.sha256(in_path.read_bytes()).hexdigest()
            scan = get_or_create_scan(
                s, digest, in_path, name, shape, (1.0, 1.0, 1.0), "".join(nib.aff2axcodes(affine)), "float32"
            )
            result = upsert_result(
                s,
                run,
                scan,
                status="ok",
                input_path=str(in_path),
                score=score,
                flagged=score >= SCAN_THRESHOLD,
                map_path=str(map_path),
                recon_path=str(recon_path),
                mask_path=str(mask_path),
                timing_s=1.5 + i,
                details=details,
                findings=[_finding(residual, mask, affine)] if mask.any() else [],
            )
            if lesion_at is not None:
                info.lesion_centre_mm[result.id] = tuple(
                    float(v) for v in (affine @ np.r_[lesion_at, 1.0])[:3]
                )
            if i == 0:
                other_scan = scan
        bad = inputs / "broken.nii.gz"
        bad.write_text("not a nifti file")
        broken = get_or_create_scan(s, hashlib.sha256(b"broken").hexdigest(), bad, "broken")
        failed = upsert_result(
            s,
            run,
            broken,
            status="failed",
            input_path=str(bad),
            error=f"{bad}: not a NIfTI file: it is a text file (supply a NIfTI-1 or NIfTI-2 file)",
            timing_s=0.01,
        )
        info.failed_id = failed.id
        upsert_result(
            s,
            other,
            other_scan,
            status="ok",
            input_path=str(inputs / "patient00.nii.gz"),
            score=0.3,
            map_path=str(out_dir / "patient00_anomaly.nii.gz"),
            timing_s=1.0,
        )
        finish_run(s, run)
        finish_run(s, other)
    with store.session() as s:
        info.ok_ids = [r.result_id for r in run_results(s, info.run_id, status="ok", order="score_desc")]
    store.close()
    return info


def test_filled_db_holds_what_the_dashboard_tests_expect(tmp_path: Path) -> None:
    db = build_filled_db(tmp_path, n_ok=3)
    store = open_store(db.url)
    with store.session() as s:
        results = list(s.scalars(select(Result).where(Result.run_id == db.run_id)))
        assert len(results) == 4
        assert sum(r.status == "failed" for r in results) == 1
        assert all(Path(r.map_path).is_file() for r in results if r.status == "ok")
        assert [len(r.findings) for r in sorted(results, key=lambda r: r.id) if r.status == "ok"] == [1, 0, 1]
        scores = [r.score for r in run_results(s, db.run_id, status="ok", order="score_desc")]
        assert scores == sorted(scores, reverse=True) and scores[0] > SCAN_THRESHOLD
    store.close()

"""``anomaly score``: maps, scores and database rows for files and folders of NIfTI scans."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from pipelines.commands.common import (
    UserError,
    add_contrast_option,
    add_db_option,
    add_model_option,
    add_raw_input_options,
    new_parser,
    raw_input_settings,
    store_from,
)

if TYPE_CHECKING:
    from pipelines.executors import Executor


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = new_parser(sub, "score", "Score NIfTI scans and DICOM series: writes DIR/<name>_anomaly.nii.gz per "
                   "scan, records results in the database, skips scans already scored with the same model and "
                   "settings. Each DICOM series in a folder or zip archive is one scan, named "
                   "<folder>_s<series number>_<description>; its contrast is read from the series.",
                   "anomaly score data/sample --out results/demo --csv results/demo/scores.csv\n"
                   "  anomaly score /pacs/export/study42 study43.zip --out results/pacs --model intensity\n"
                   "  anomaly score raw_heads/ --out results/raw --skull-strip auto --register mni --calibration demo\n"
                   "  anomaly score s01/flair.nii.gz --out results/flair --t1-for-mask s01/t1.nii.gz")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="NIfTI files, DICOM folders, zip archives of DICOM files, or folders of them (searched "
                        "recursively)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the maps")
    add_model_option(p)
    add_db_option(p)
    p.add_argument("--csv", metavar="FILE", help="also write one row per scan to this CSV file")
    p.add_argument("--calibration", metavar="NAME[@VERSION]",
                   help="apply a stored calibration: writes <name>_mask.nii.gz and flags scans")
    p.add_argument("--force-calibration", action="store_true",
                   help="apply --calibration even when it was made with other scoring settings")
    p.add_argument("--config", metavar="YAML", help="scoring settings (default: configs/score/default.yaml values)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                   help="model arithmetic: auto (the default: bf16 where the device has native bf16 units, "
                        "else fp32), fp32, or bf16 autocast (1.3x faster on CPUs with native bf16 units, many "
                        "times slower on CPUs without)")
    add_contrast_option(p)
    add_raw_input_options(p)
    p.add_argument("--batch-size", type=int, help="slices per model call")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)")
    p.add_argument("--no-recon", action="store_true", help="do not write <name>_recon.nii.gz")
    p.add_argument("--atlas", default="aal", help="atlas for finding regions (aal, harvard-oxford, none)")
    p.add_argument("--executor", choices=("local", "dask"), default="local",
                   help="local: this process, reading ahead in threads; dask: a Dask cluster")
    p.add_argument("--scheduler", metavar="ADDRESS", help="Dask scheduler address (default: a local cluster)")
    p.add_argument("--workers", type=int, default=2, help="workers of the local Dask cluster (default 2)")
    p.add_argument("--max-volume-mb", type=float, metavar="MB",
                   help="memory budget of one volume: a scan whose voxels need more is refused before reading "
                        "(default: $ANOMALY_MAX_VOLUME_MB, else 1024)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible to PyTorch; use --device cpu")
    return name


def optional_atlas(args: argparse.Namespace) -> object | None:
    """The atlas that names finding regions (findings need --calibration), or None with a note when
    it cannot be loaded: regions are optional, scoring goes on without them."""
    if not args.calibration or args.atlas == "none":
        return None
    from anomaly.atlas import load_atlas

    try:
        return load_atlas(args.atlas)
    except Exception as exc:  # noqa: BLE001 - regions are optional
        print(f"note: atlas {args.atlas!r} unavailable ({exc}); findings will have no region", file=sys.stderr)
        return None


def make_executor(args: argparse.Namespace) -> Executor:
    if args.executor == "dask":
        from pipelines.dask_executor import DaskExecutor

        return DaskExecutor(address=args.scheduler, n_workers=args.workers)
    from pipelines.executors import LocalExecutor

    return LocalExecutor()


def run(args: argparse.Namespace) -> int:
    from anomaly.config import load_scoring_settings
    from anomaly.models import load_model
    from anomaly.volume import VolumeError, max_volume_bytes
    from pipelines.batch import score_batch
    from pipelines.commands.common import check_csv_path, check_out_dir

    try:
        max_bytes = max_volume_bytes(args.max_volume_mb)
    except VolumeError as exc:
        raise UserError(f"--max-volume-mb: {exc.reason}; {exc.hint}") from None
    check_out_dir(args.out)
    if args.csv:
        check_csv_path(args.csv)

    device = resolve_device(args.device)
    settings = load_scoring_settings(args.config, precision=args.precision, batch_size=args.batch_size,
                                     contrast=args.contrast, device=device, preprocess=raw_input_settings(args),
                                     save_reconstruction=False if args.no_recon else None)
    model = load_model(args.model, precision=settings.precision, device=device)
    if settings.preprocess.register != "none" and not args.calibration:
        print("note: --register mni names finding regions only with --calibration (findings need a threshold)",
              file=sys.stderr)
    atlas = optional_atlas(args)
    from pipelines.privacy import patient_salt

    store = store_from(args)
    try:
        summary = score_batch(args.inputs, args.out, model, store, settings, calibration=args.calibration,
                              force_calibration=args.force_calibration, executor=make_executor(args),
                              csv_path=args.csv, progress=not args.quiet, atlas=atlas,
                              patient_salt=patient_salt(), max_bytes=max_bytes, brain_mask=args.brain_mask,
                              t1_for_mask=args.t1_for_mask)
    finally:
        store.close()
    ok, failed, skipped = summary.count("ok"), summary.count("failed"), summary.count("skipped")
    for note in summary.notes:
        print(f"note: {note}", file=sys.stderr)
    for row in summary.rows:
        if row["status"] == "failed":
            print(f"FAILED {row['error']}", file=sys.stderr)
        elif row.get("warnings"):
            print(f"warning: {row['path']}: {row['warnings']}", file=sys.stderr)
    flagged = sum(1 for r in summary.rows if r.get("flagged") is True)
    print(f"run {summary.run_id} ({model.name}): {ok} scored, {skipped} skipped (already scored), {failed} failed"
          + (f", {flagged} flagged" if args.calibration else "") + f" in {summary.seconds:.1f} s")
    print(f"maps: {summary.out_dir}")
    print(f"database: {summary.db_url}")
    if args.csv:
        print(f"csv: {args.csv}")
    return 1 if failed else 0

"""``anomaly evaluate``: a scored run against ground-truth masks: metrics, plots, a JSON summary, MOOD export."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pipelines.commands.common import (
    UserError,
    add_db_option,
    add_exact_voxels_option,
    check_out_dir,
    new_parser,
    store_from,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = new_parser(sub, "evaluate", "Evaluate a scored run against ground-truth lesion masks: voxel AUROC/AUPRC, "
                   "Dice and lesion detection at the calibrated threshold, best Dice (oracle), scan AUROC; writes "
                   "summary.json, per_scan.csv, ROC/PR/Dice plots and a MOOD-layout export.",
                   "anomaly evaluate --db results/demo.db --run 2 --labels data/sample/labels --out results/eval\n"
                   "  anomaly evaluate --db results/demo.db --run latest --labels data/sample/labels "
                   "--healthy-without-labels")
    add_db_option(p)
    p.add_argument("--run", type=_run_ref, required=True, metavar="ID",
                   help="run to evaluate (`anomaly score` prints its id), or 'latest' for the most recent run")
    p.add_argument("--labels", required=True, metavar="DIR", help="ground-truth masks named like the scans "
                   "(<name>.nii.gz or the scan's own file name), on the scans' grids")
    p.add_argument("--out", metavar="DIR", help="output folder (default: <run's map folder>/evaluation)")
    p.add_argument("--calibration", metavar="NAME[@VERSION]",
                   help="thresholds to evaluate at (default: the calibration the run was scored with)")
    p.add_argument("--force-calibration", action="store_true",
                   help="apply --calibration even when it was made with other scoring settings")
    p.add_argument("--healthy-without-labels", action="store_true",
                   help="count scans that have no label file as lesion-free (default: leave them out)")
    p.add_argument("--mood", metavar="DIR", help="folder for the MOOD export (default: OUT/mood)")
    add_exact_voxels_option(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _run_ref(value: str) -> int | None:
    if value.strip().lower() == "latest":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a run id; give a number or 'latest'") from None


def _f(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None else f"{float(value):.{digits}f}"


def run(args: argparse.Namespace) -> int:
    from anomaly.volume import VolumeError
    from pipelines.calibrate import CalibrateError
    from pipelines.evaluate import EvaluateError, evaluate_run

    if args.out:
        check_out_dir(args.out)
    store = store_from(args)
    try:
        report = evaluate_run(store, args.run, args.labels, args.out, calibration=args.calibration,
                              force_calibration=args.force_calibration,
                              healthy_without_labels=args.healthy_without_labels, mood_dir=args.mood,
                              progress=not args.quiet, exact_cap=args.exact_voxels)
    except (EvaluateError, CalibrateError, VolumeError) as exc:
        raise UserError(f"evaluation refused: {exc}") from exc
    finally:
        store.close()
    summary = report.summary
    for note in summary["notes"]:
        print(f"note: {note}", file=sys.stderr)
    voxel, scans, cal = summary["voxel"], summary["scans"], summary["calibration"]
    print(f"run {summary['run_id']} ({summary['model']}): {scans['evaluated']} scans evaluated "
          f"({scans['with_lesions']} with lesions), {scans['skipped_without_labels']} without labels left out")
    print(f"  voxel AUROC {_f(voxel['auroc'])}  AUPRC {_f(voxel['auprc'])}  (pooled over {voxel['n_voxels']} brain "
          f"voxels, {voxel['n_lesion_voxels']} lesion)")
    best = voxel.get("best_dice_oracle")
    if best:
        print(f"  best Dice {_f(best['dice'])} at threshold {best['threshold']:.6g} (oracle upper bound)")
    if cal is not None:
        at = voxel["at_threshold"]
        print(f"  at {cal['ref']} (voxel threshold {cal['voxel_threshold']:.6g}): Dice {_f(at['dice'])}, "
              f"sensitivity {_f(at['sensitivity'])}, voxel FPR {_f(at['fpr'], 5)}")
        lesion = summary["lesion"]
        if lesion:
            print(f"  lesions: {lesion['n_detected']}/{lesion['n_lesions']} detected (sensitivity "
                  f"{_f(lesion['sensitivity'], 3)}), {lesion['n_false_positive_components']} false-positive "
                  f"components ({lesion['false_positive_components_per_scan']:.2f} per scan)")
    scan = summary["scan"]
    print(f"  scan AUROC {_f(scan['auroc'])} ({scan['n_abnormal']} abnormal, {scan['n_normal']} normal)")
    print(f"written: {report.out_dir} (summary.json, per_scan.csv, plots), MOOD export in {summary['files']['mood']}")
    return 0

"""``anomaly calibrate``: thresholds from healthy (or labelled) scans, stored as a versioned calibration."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from anomaly.records import DEFAULT_MIN_VOLUME_ML, CalibrationData
from pipelines.commands.common import (
    UserError,
    add_contrast_option,
    add_db_option,
    add_exact_voxels_option,
    add_model_option,
    add_raw_input_options,
    check_out_dir,
    new_parser,
    raw_input_settings,
    store_from,
)

EXAMPLE = ("anomaly calibrate --db results/demo.db --model intensity --healthy data/healthy --target-fpr 0.01 "
           "--scan-target-fpr 0.1 --name healthy-1pct\n"
           "  anomaly calibrate --db results/demo.db --model intensity --scans data/sample/lesions "
           "--labels data/sample/labels --name best-dice\n"
           "  anomaly calibrate --db results/demo.db --list")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = new_parser(sub, "calibrate", "Find voxel and scan thresholds on healthy scans (at a target false-positive "
                   "rate) or on labelled scans (best Dice), and store them as NAME@VERSION for `anomaly score "
                   "--calibration`.", EXAMPLE)
    add_db_option(p)
    add_model_option(p)
    p.add_argument("--healthy", "--scans", dest="inputs", nargs="+", metavar="INPUT",
                   help="NIfTI files or folders of the calibration scans (healthy ones, or labelled with --labels)")
    p.add_argument("--name", help="calibration name; each run stores the next version (NAME@1, NAME@2, ...)")
    p.add_argument("--target-fpr", type=float, metavar="RATE",
                   help="voxel false-positive rate on healthy brains, e.g. 0.01 (required without --labels)")
    p.add_argument("--scan-target-fpr", type=float, metavar="RATE",
                   help="share of healthy scans allowed above the scan threshold, e.g. 0.05 (needs at least "
                        "1/RATE healthy scans); without it no scan threshold is set")
    p.add_argument("--labels", metavar="DIR", help="ground-truth masks named like the scans: calibrate for the "
                   "best Dice instead of a false-positive rate")
    p.add_argument("--healthy-without-labels", action="store_true",
                   help="with --labels: count scans that have no label file as lesion-free (default: refuse)")
    p.add_argument("--out", metavar="DIR", help="folder for the calibration maps (default: calibration/NAME beside "
                   "the database file)")
    p.add_argument("--config", metavar="YAML", help="scoring settings; score later with the same file")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                   help="model arithmetic (default auto: bf16 where the device has native bf16 units, else fp32); "
                        "score later with the same")
    add_contrast_option(p)
    add_raw_input_options(p)
    p.add_argument("--batch-size", type=int, help="slices per model call (speed only)")
    p.add_argument("--min-volume-ml", type=float, default=DEFAULT_MIN_VOLUME_ML,
                   help=f"smallest finding kept when the calibration is applied (default {DEFAULT_MIN_VOLUME_ML} mL)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap draws over scans for 95%% confidence intervals (default 1000; 0 = none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap draws")
    add_exact_voxels_option(p)
    p.add_argument("--list", action="store_true", help="list the stored calibrations and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{float(value):.6g}"


def _ci(metrics: dict[str, Any], key: str) -> str:
    ci = metrics.get(key)
    return f" (95% CI {_fmt(ci[0])} to {_fmt(ci[1])})" if ci else ""


def _n_scans(data: CalibrationData) -> int:
    return data.n_scans if data.n_scans is not None else len(data.scans)


def run_list(args: argparse.Namespace) -> int:
    from anomaly.store import list_calibrations

    store = store_from(args)
    try:
        with store.session() as s:
            rows = [(c.ref, c.model.name, c.method, c.voxel_threshold, c.scan_threshold, c.target_fpr,
                     _n_scans(CalibrationData.from_dict(c.data)), c.created_at)
                    for c in list_calibrations(s)]
    finally:
        store.close()
    if not rows:
        print(f"no calibrations in {store.url}; create one with `anomaly calibrate --healthy ... --name NAME`")
        return 0
    print(f"{'calibration':24s} {'model':14s} {'method':14s} {'voxel thr':>11s} {'scan thr':>11s} "
          f"{'target fpr':>10s} {'scans':>5s}  created")
    for ref, model, method, voxel, scan, target, n, created in rows:
        print(f"{ref:24s} {model:14s} {method:14s} {_fmt(voxel):>11s} {_fmt(scan):>11s} {_fmt(target):>10s} "
              f"{n:>5}  {created:%Y-%m-%d %H:%M}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.list:
        return run_list(args)
    if not args.inputs or not args.name:
        raise UserError("calibrate needs --healthy INPUT... and --name NAME (or --list); see `anomaly calibrate "
                        "--help`")
    if args.labels is None and args.target_fpr is None:
        raise UserError("--target-fpr is required for a calibration on healthy scans (e.g. --target-fpr 0.01), "
                        "or give --labels DIR for a labelled calibration")
    from anomaly.config import load_scoring_settings
    from anomaly.models import load_model
    from anomaly.volume import VolumeError
    from pipelines.calibrate import CalibrateError, CalibrationError, run_calibration

    settings = load_scoring_settings(args.config, precision=args.precision, batch_size=args.batch_size,
                                     contrast=args.contrast, preprocess=raw_input_settings(args),
                                     save_reconstruction=False)
    if args.out:
        check_out_dir(args.out)
    model = load_model(args.model, precision=settings.precision)
    store = store_from(args)
    try:
        outcome = run_calibration(args.inputs, model, store, settings, name=args.name, target_fpr=args.target_fpr,
                                  scan_target_fpr=args.scan_target_fpr, labels_dir=args.labels,
                                  healthy_without_labels=args.healthy_without_labels, out_dir=args.out,
                                  min_volume_ml=args.min_volume_ml, n_bootstrap=args.bootstrap, seed=args.seed,
                                  progress=not args.quiet, brain_mask=args.brain_mask,
                                  t1_for_mask=args.t1_for_mask, exact_cap=args.exact_voxels)
    except (CalibrateError, CalibrationError, VolumeError) as exc:
        raise UserError(f"calibration refused: {str(exc).replace('n_bootstrap=0', '--bootstrap 0')}") from exc
    finally:
        store.close()
    for note in outcome.notes:
        print(f"note: {note}", file=sys.stderr)
    result, m = outcome.result, outcome.result.metrics
    print(f"calibration {outcome.ref} ({result.method}, model {model.name}, {len(outcome.scans)} scans, "
          f"{m.get('n_voxels', 0)} brain voxels)")
    if result.method == "healthy-fpr":
        print(f"  voxel threshold {_fmt(result.voxel_threshold)}{_ci(m, 'voxel_threshold_ci')}: "
              f"false-positive rate {m['achieved_fpr']:.4g} on these scans (target {result.target_fpr:g})")
        if result.scan_threshold is not None:
            print(f"  scan threshold {_fmt(result.scan_threshold)}{_ci(m, 'scan_threshold_ci')}: "
                  f"{m['achieved_scan_fpr']:.3g} of these scans above it (target {m['scan_target_fpr']:g})")
        else:
            print("  no scan threshold (give --scan-target-fpr to flag scans)")
    else:
        point = m["operating_point"]
        print(f"  voxel threshold {_fmt(result.voxel_threshold)}: pooled Dice {m['best_dice']:.4f} "
              f"(sensitivity {point['sensitivity']:.3f}, precision {point['precision']:.3f})")
        for op in m.get("operating_points", []):
            print(f"  sensitivity {op['target_sensitivity']:.2f}: threshold {_fmt(op['threshold'])}, "
                  f"precision {op['precision']:.3f}, Dice {op['dice']:.3f}")
        if result.scan_threshold is not None:
            print(f"  scan threshold {_fmt(result.scan_threshold)} (Youden J {m['scan_youden_j']:.3f}, "
                  f"scan AUROC {m['scan_auroc']:.3f})")
        else:
            print(f"  no scan threshold ({m.get('scan_threshold_note', 'needs abnormal and normal scans')})")
    if m.get("pooling", {}).get("method") == "binned":
        print(f"  note: {m['pooling']['note']}")
    print(f"maps: {outcome.out_dir} (run {outcome.run_id})")
    print(f"apply with: anomaly score INPUT... --out DIR --model {args.model} --calibration {outcome.ref}"
          + (f" --db {args.db}" if args.db else "")
          + (f" --config {args.config}" if args.config else "")
          + (f" --precision {args.precision}" if args.precision else "")
          + "".join(f" --{flag.replace('_', '-')} {getattr(args, flag)}" for flag in
                    ("skull_strip", "register", "register_transform") if getattr(args, flag, None))
          + (" --brain-mask MASKS" if args.brain_mask else ""))
    return 0

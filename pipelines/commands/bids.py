"""``anomaly bids``: a BIDS App. ``participant`` scores a BIDS dataset's anatomical images into a BIDS
derivatives dataset with one HTML report per subject; ``group`` gathers scores and findings into tables."""

from __future__ import annotations

import argparse
import sys

from pipelines.commands.common import (
    add_contrast_option,
    add_db_option,
    add_model_option,
    new_parser,
    store_from,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = new_parser(
        sub, "bids",
        "BIDS App: score every anatomical image (T1w, T2w, FLAIR, PDw, T2starw) of a BIDS dataset into "
        "OUTPUT_DIR as a BIDS derivatives dataset: per image <entities>_desc-anomaly_<suffix>.nii.gz, "
        "_desc-brain<suffix>_mask and with --calibration _desc-anomaly<suffix>_mask, each with a JSON sidecar; "
        "one sub-<label>.html report per subject. The contrast comes from the BIDS suffix and sidecar. "
        "The group level writes group_scans.tsv and group_findings.tsv.",
        "anomaly bids /data/ds001 /data/ds001/derivatives/anomaly participant --participant-label 01 02\n"
        "  anomaly bids /data/ds001 /data/ds001/derivatives/anomaly group")
    p.add_argument("bids_dir", metavar="BIDS_DIR", help="root of the BIDS dataset (holds dataset_description.json)")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="the derivatives folder to write")
    p.add_argument("analysis_level", choices=("participant", "group"), help="participant: score; group: gather")
    p.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL",
                   help="subjects to score (with or without 'sub-'; default: all)")
    p.add_argument("--session-label", "--session_label", nargs="+", metavar="LABEL",
                   help="sessions to score (with or without 'ses-'; default: all)")
    p.add_argument("--skip-bids-validation", action="store_true",
                   help="index files whose names are not valid BIDS too")
    add_model_option(p)
    add_db_option(p)
    p.add_argument("--calibration", metavar="NAME[@VERSION]",
                   help="apply a stored calibration: findings masks, findings and flags")
    p.add_argument("--force-calibration", action="store_true",
                   help="apply --calibration even when it was made with other scoring settings")
    p.add_argument("--config", metavar="YAML", help="scoring settings (default: configs/score/default.yaml values)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                   help="model arithmetic (default auto: bf16 where the device has native bf16 units, else fp32)")
    add_contrast_option(p)
    p.add_argument("--batch-size", type=int, help="slices per model call")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--no-recon", action="store_true", help="do not write the _desc-recon reconstructions")
    p.add_argument("--no-reports", action="store_true", help="do not write the sub-<label>.html reports")
    p.add_argument("--atlas", default="aal", help="atlas for finding regions (aal, harvard-oxford, none)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.analysis_level == "group":
        from pipelines.bids_app import run_group

        scans, findings, n = run_group(args.output_dir)
        print(f"group: {n} image(s) gathered into {scans} and {findings}")
        return 0
    from anomaly.config import load_scoring_settings
    from anomaly.models import load_model
    from pipelines.bids_app import run_participant
    from pipelines.commands.score import optional_atlas, resolve_device

    settings = load_scoring_settings(args.config, precision=args.precision, batch_size=args.batch_size,
                                     contrast=args.contrast, save_reconstruction=False if args.no_recon else None)
    model = load_model(args.model, precision=settings.precision, device=resolve_device(args.device))
    atlas = optional_atlas(args)
    store = store_from(args)
    try:
        summary = run_participant(args.bids_dir, args.output_dir, model, store, settings,
                                  participants=args.participant_label, sessions=args.session_label,
                                  calibration=args.calibration, force_calibration=args.force_calibration,
                                  progress=not args.quiet, atlas=atlas, validate=not args.skip_bids_validation,
                                  reports=not args.no_reports)
    finally:
        store.close()
    batch = summary.batch
    for row in batch.rows:
        if row["status"] == "failed":
            print(f"FAILED {row['error']}", file=sys.stderr)
        elif row.get("warnings"):
            print(f"warning: {row['path']}: {row['warnings']}", file=sys.stderr)
    ok, failed, skipped = batch.count("ok"), batch.count("failed"), batch.count("skipped")
    subjects = sorted({im.subject for im in summary.images})
    print(f"run {batch.run_id} ({model.name}): {len(summary.images)} image(s) of {len(subjects)} subject(s): "
          f"{ok} scored, {skipped} skipped (already scored), {failed} failed in {batch.seconds:.1f} s")
    print(f"derivatives: {batch.out_dir}")
    for report in summary.reports:
        print(f"report: {report}")
    print(f"database: {batch.db_url}")
    return 1 if failed else 0

"""``anomaly sample-data``: real template brains from installed packages plus copies with lesions."""

from __future__ import annotations

import argparse

from pipelines.commands.common import new_parser


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = new_parser(sub, "sample-data", "Write sample brains (MNI152 from nilearn, Colin27 from mricron-data when "
                   "installed) and copies with synthetic lesions plus their ground-truth masks.",
                   "anomaly sample-data data/sample")
    p.add_argument("out", metavar="DIR")
    p.add_argument("--copies", type=int, default=2, help="lesion copies per brain (default 2)")
    p.add_argument("--calibration-copies", type=int, default=6,
                   help="healthy variants of the MNI brain for calibration (default 6)")
    p.add_argument("--no-colin", action="store_true", help="leave out Colin27")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from anomaly.sampledata import make_sample_data

    manifest = make_sample_data(Path(args.out), include_colin=not args.no_colin, n_lesion_copies=args.copies,
                                seed=args.seed, n_calibration=args.calibration_copies)
    print(f"sample data in {manifest.out_dir}: {len(manifest.healthy)} healthy brains (healthy/), "
          f"{len(manifest.lesions)} with synthetic lesions (lesions/), ground-truth masks (labels/), "
          f"{len(manifest.calibration)} healthy variants for calibration (calibration/)")
    for note in manifest.notes:
        print(f"note: {note}")
    if manifest.evaluation_only:
        print("Colin27 files are for evaluation only: never train on them (see README.txt there)")
    return 0

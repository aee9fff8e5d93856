"""Options and helpers shared by several verbs (database URL, model name)."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from anomaly.contrast import SETTINGS

if TYPE_CHECKING:
    from anomaly.store import Store


class UserError(RuntimeError):
    """An error the user can fix; the command line prints it without a traceback."""


def add_db_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", metavar="URL", default=None,
                        help="database URL or SQLite file path (default: $ANOMALY_DB, else ./anomaly.db)")


def _count(value: str) -> int:
    try:
        number = int(value.replace("_", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number; e.g. 50000000") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be 0 or more")
    return number


def add_exact_voxels_option(parser: argparse.ArgumentParser) -> None:
    """``--exact-voxels N``: pooled brain voxels up to which pooled figures are exact (binned above)."""
    from anomaly.pooled import DEFAULT_BINS, DEFAULT_CAP

    parser.add_argument("--exact-voxels", type=_count, default=DEFAULT_CAP, metavar="N",
                        help=f"pooled brain voxels held for exact figures (default {DEFAULT_CAP:,}, about "
                             f"{DEFAULT_CAP * 4 // 10**6} MB); above, the maps are read twice and pooled in "
                             f"{DEFAULT_BINS:,} bins, so memory stays bounded (the summary gives the bin width)")


def add_model_option(parser: argparse.ArgumentParser, default: str = "default") -> None:
    parser.add_argument("--model", metavar="NAME|PATH", default=default,
                        help=f"model name (see `anomaly models list`) or model folder (default: {default})")


def store_from(args: argparse.Namespace) -> Store:
    """Open the store named by ``--db`` (or ``$ANOMALY_DB``); a bad path or URL is a one-line UserError."""
    from anomaly.store import StoreError, default_db_url, normalize_db_url, open_store

    given = args.db or default_db_url()
    try:
        return open_store(normalize_db_url(args.db) if args.db else given)
    except (StoreError, ValueError) as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(f"--db {given}: cannot use it ({exc.strerror or exc}); give a writable file path or a "
                        "database URL") from None


def check_out_dir(value: str | os.PathLike[str], option: str = "--out") -> Path:
    """Create the output folder when needed and prove it writable (a temporary file), before any work."""
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path}: is a file, not a folder; give a folder path for the outputs")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".anomaly-write-test."):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UserError(f"{option} {path}: cannot write there ({reason}); choose a folder you can write to") from None
    return path


def check_csv_path(value: str | os.PathLike[str], option: str = "--csv") -> Path:
    """Refuse a CSV path that is a folder, or whose parent is a file, before any scoring is done."""
    path = Path(value).expanduser()
    if path.is_dir():
        raise UserError(f"{option} {path}: is a folder; give a file name, e.g. {path / 'scores.csv'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"{option} {path}: {parent} is a file, not a folder; give another CSV path")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise UserError(f"{option} {path}: cannot write in {parent} (permission denied); give another CSV path")
    return path


def new_parser(sub: argparse._SubParsersAction, name: str, summary: str, example: str) -> argparse.ArgumentParser:
    """A verb parser whose help ends with a worked example."""
    return sub.add_parser(name, help=summary, description=summary, epilog=f"example:\n  {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def add_contrast_option(p: argparse.ArgumentParser) -> None:
    """``--contrast``: the MRI contrast of the scans, which decides how brightness enters the map."""
    p.add_argument("--contrast", choices=SETTINGS,
                   help="contrast of the scans (default auto: read from file names such as *_T1w, t1ce, t2, flair; "
                        "t1c is a contrast-enhanced T1; scans whose name says none count all brightness as on "
                        "T2/FLAIR)")


def add_raw_input_options(p: argparse.ArgumentParser) -> None:
    """Brain extraction and registration of raw heads (``--skull-strip``, ``--brain-mask``, ``--register``)."""
    p.add_argument("--skull-strip", choices=("auto", "force", "skip"),
                   help="brain extraction (deepbet) before the model: auto (default) strips volumes that look like "
                        "a head with skull, force strips every scan, skip never; the mask used is written as "
                        "<name>_brain.nii.gz")
    p.add_argument("--brain-mask", metavar="FILE|FOLDER",
                   help="use your own brain masks: one mask file, or a folder of masks named like the scans "
                        "(<name>.nii.gz, <name>_mask.nii.gz, <name>_brain_mask.nii.gz ...) on the scans' grids")
    p.add_argument("--t1-for-mask", metavar="auto|none|FILE", default="auto",
                   help="where the brain mask of a T2/FLAIR head comes from: auto (default) carries over the mask of "
                        "a T1 of the same session found beside the scan (BIDS *_T1w, or t1 in place of t2/flair in "
                        "the name), FILE names that T1, none runs deepbet on the scan itself")
    p.add_argument("--register", choices=("none", "mni"),
                   help="mni: register each scan to the MNI152 template (ANTsPy) before the model; maps still come "
                        "back on the input grid and findings get atlas regions (default none)")
    p.add_argument("--register-transform", choices=("affine", "deformable"),
                   help="with --register mni: affine (default) or deformable (affine + SyN, slower)")


def raw_input_settings(args: argparse.Namespace) -> dict[str, str | None]:
    """The preprocessing overrides the raw-input options ask for (``mask`` when --brain-mask is given)."""
    skull = getattr(args, "skull_strip", None)
    if getattr(args, "brain_mask", None):
        if skull not in (None, "auto"):
            raise UserError(f"--brain-mask and --skull-strip {skull} exclude each other: the given masks are used")
        skull = "mask"
    return {"skull_strip": skull, "register": getattr(args, "register", None),
            "register_transform": getattr(args, "register_transform", None)}

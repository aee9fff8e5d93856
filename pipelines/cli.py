"""The ``anomaly`` command line: one verb per job, each in its own module under ``pipelines.commands``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

VERBS = ("score", "bids", "calibrate", "evaluate", "export", "models", "sample-data", "train", "dashboard")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anomaly",
        description="Brain MRI anomaly detection: score NIfTI scans, DICOM series and BIDS datasets, calibrate "
                    "thresholds, review results.",
        epilog="example:\n  anomaly sample-data data/sample && anomaly score data/sample --out results/demo\n\n"
               "Run `anomaly VERB --help` for each verb.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb in VERBS:
        module = importlib.import_module(f"pipelines.commands.{verb.replace('-', '_')}")
        module.add_parser(sub)
    return parser


def _version() -> str:
    from anomaly import __version__

    return __version__


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors the user can fix: printed as one line without a traceback."""
    from anomaly.config import ConfigError
    from anomaly.models.folder import ModelLoadError
    from anomaly.store import NotFoundError
    from pipelines.batch import BatchError
    from pipelines.commands.common import UserError

    return (UserError, BatchError, ConfigError, ModelLoadError, NotFoundError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``anomaly`` script; returns the process exit code."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "verb", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted: results written so far are kept; run the same command again to resume",
              file=sys.stderr)
        return 130
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

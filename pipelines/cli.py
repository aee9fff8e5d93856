"""The ``anomaly`` command line: one verb per job, each in its own module under ``pipelines.commands``."""

from __future__ import annotations

import signal
import sys


def _interrupted_while_starting(signum: int, frame: object) -> None:
    sys.stderr.write("interrupted while starting: nothing was written\n")
    raise SystemExit(130)


# Run as the `anomaly` command: Ctrl-C while the imports below load ends quietly, not with a traceback.
if __name__ == "__main__" or sys.argv[0].rsplit("/", 1)[-1] == "anomaly":
    signal.signal(signal.SIGINT, _interrupted_while_starting)

import argparse  # noqa: E402
import importlib  # noqa: E402
import os  # noqa: E402
from collections.abc import Sequence  # noqa: E402

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
    from anomaly.models.safe_unpickle import CheckpointFormatError
    from anomaly.store import NotFoundError, StoreError
    from anomaly.training.common import CheckpointError
    from pipelines.batch import BatchError
    from pipelines.commands.common import UserError

    return (UserError, BatchError, ConfigError, ModelLoadError, NotFoundError, StoreError, CheckpointError,
            CheckpointFormatError)


DEBUG_ENV = "ANOMALY_DEBUG"
"""Set to 1 to see the full traceback of an unexpected error instead of its one-line summary."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def describe_error(exc: BaseException, db: str | None = None) -> tuple[str, int]:
    """The one-line message and exit code for an error that ends a command (``db``: the --db given)."""
    if isinstance(exc, user_errors()):
        return f"error: {_one_line(str(exc))}", 2
    from sqlalchemy.exc import DBAPIError

    if isinstance(exc, DBAPIError):
        from anomaly.store import describe_db_error

        return f"error: {_one_line(describe_db_error(exc, db or os.environ.get('ANOMALY_DB') or 'in use'))}", 1
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        reason = exc.strerror or str(exc)
        fix = {"No space left on device": "free space and run the same command again (results so far are kept)",
               "Read-only file system": "choose a writable location",
               "Permission denied": "check the permissions or choose another location",
               "File name too long": "use a shorter file or folder name"}.get(reason, "check the path and try again")
        return f"error: {where}{_one_line(reason)}; {fix}", 1
    if isinstance(exc, RecursionError):
        return "error: the input is nested too deeply to read (RecursionError); it is damaged or hostile", 1
    if isinstance(exc, MemoryError):
        return "error: out of memory; run it on a machine with more memory or on fewer inputs", 1
    return (f"error: unexpected {type(exc).__name__}: {_one_line(str(exc))[:500]} (set {DEBUG_ENV}=1 to see the "
            "traceback, and report it with the command)"), 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``anomaly`` script; returns the process exit code.

    Every error ends as one line on stderr (no traceback unless ``ANOMALY_DEBUG=1``); Ctrl-C at any
    moment, even while the command starts, ends with exit code 130 and keeps what was written."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args: argparse.Namespace | None = None
    try:
        if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "verb", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted: results written so far are kept; run the same command again to resume",
              file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - the command line shows one line, never a traceback
        if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
            raise
        message, code = describe_error(exc, getattr(args, "db", None))
        print(message, file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Options and helpers shared by several verbs (database URL, model name)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from anomaly.store import Store


class UserError(RuntimeError):
    """An error the user can fix; the command line prints it without a traceback."""


def add_db_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", metavar="URL", default=None,
                        help="database URL or SQLite file path (default: $ANOMALY_DB, else ./anomaly.db)")


def add_model_option(parser: argparse.ArgumentParser, default: str = "default") -> None:
    parser.add_argument("--model", metavar="NAME|PATH", default=default,
                        help=f"model name (see `anomaly models list`) or model folder (default: {default})")


def store_from(args: argparse.Namespace) -> Store:
    from anomaly.store import default_db_url, normalize_db_url, open_store

    return open_store(normalize_db_url(args.db) if args.db else default_db_url())


def new_parser(sub: argparse._SubParsersAction, name: str, summary: str, example: str) -> argparse.ArgumentParser:
    """A verb parser whose help ends with a worked example."""
    return sub.add_parser(name, help=summary, description=summary, epilog=f"example:\n  {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def add_contrast_option(p: argparse.ArgumentParser) -> None:
    """``--contrast``: the MRI contrast of the scans, which decides how brightness enters the map."""
    p.add_argument("--contrast", choices=("auto", "t1", "t2", "flair"),
                   help="contrast of the scans (default auto: read from file names such as *_T1w, t2, flair; "
                        "scans whose name says none count all brightness as on T2/FLAIR)")

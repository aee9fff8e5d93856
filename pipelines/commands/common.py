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

"""``anomaly export``: results, findings and reviews from the database to CSV files."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.commands.common import add_db_option, new_parser, store_from

TABLES = ("results", "findings", "reviews")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = new_parser(sub, "export", "Export results (one row per scan), findings or reviews to CSV.",
                   "anomaly export --db results/demo.db --csv results/scores.csv --run 1")
    add_db_option(p)
    p.add_argument("--csv", required=True, metavar="FILE", help="output CSV file")
    p.add_argument("--run", type=int, metavar="ID", help="only this run (default: all runs)")
    p.add_argument("--table", choices=TABLES, default="results", help="what to export (default: results)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from anomaly import store as st
    from pipelines.batch import write_csv

    store = store_from(args)
    try:
        with store.session() as s:
            rows = getattr(st, f"{args.table}_table")(s, args.run)
    finally:
        store.close()
    path = write_csv(Path(args.csv), rows)
    print(f"{len(rows)} {args.table} rows written to {path}")
    return 0

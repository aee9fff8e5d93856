"""``anomaly export``: results, findings and reviews from the database to CSV files."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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

    columns = {"results": st.RESULT_COLUMNS, "findings": st.FINDING_COLUMNS, "reviews": st.REVIEW_COLUMNS}
    table = {"results": st.iter_results_table, "findings": st.iter_findings_table,
             "reviews": st.iter_reviews_table}[args.table]
    store = store_from(args)
    counted = [0]

    def rows() -> Iterator[dict[str, Any]]:
        for row in table(s, args.run):  # streamed in batches: memory stays bounded at any size
            counted[0] += 1
            yield row

    try:
        with store.session() as s:
            path = write_csv(Path(args.csv), rows(), columns[args.table])
    finally:
        store.close()
    print(f"{counted[0]} {args.table} rows written to {path}")
    return 0

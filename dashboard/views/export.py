"""Export page: reviews, findings and results as CSV downloads, for the chosen run or every run."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import streamlit as st

from anomaly.store import (
    FINDING_COLUMNS,
    RESULT_COLUMNS,
    REVIEW_COLUMNS,
    RunSummary,
    Store,
    iter_findings_table,
    iter_results_table,
    iter_reviews_table,
)
from dashboard import state
from dashboard.views.common import empty_runs

SCOPE = "ex_scope"
PREVIEW_ROWS = 20


def to_csv(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> str:
    """CSV text with a header row in ``columns`` order (None as an empty cell)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buffer.getvalue()


TABLES = {
    "reviews": (iter_reviews_table, REVIEW_COLUMNS),
    "findings": (iter_findings_table, FINDING_COLUMNS),
    "results": (iter_results_table, RESULT_COLUMNS),
}


def csv_of(store: Store, name: str, run_id: int | None) -> str:
    """The CSV text of one table, read from the database (streamed) when the download is clicked."""
    table, columns = TABLES[name]
    with store.session() as s:
        return to_csv(table(s, run_id), columns)


def row_counts(run_list: list[RunSummary], run_id: int | None) -> dict[str, int]:
    """Rows of each table for one run or all, from the counts kept on the runs (no row is read)."""
    runs = [r for r in run_list if run_id is None or r.run_id == run_id]
    return {"reviews": sum(r.n_reviews for r in runs), "findings": sum(r.n_findings for r in runs),
            "results": sum(r.n_results for r in runs)}


def render(store: Store, run_list: list[RunSummary]) -> None:
    """Draw the three downloads with a preview of each."""
    st.header("Export")
    if not run_list:
        empty_runs()
        return
    run_id = st.session_state.get(state.RUN)
    options = ["this run", "all runs"]
    if st.session_state.get(SCOPE) not in options:
        st.session_state[SCOPE] = options[0]
    st.radio(
        "Scope",
        options,
        key=SCOPE,
        horizontal=True,
        format_func=lambda o: f"run {run_id}" if o == "this run" else f"all {len(run_list)} runs",
    )
    scope = None if st.session_state[SCOPE] == "all runs" else run_id
    suffix = "all-runs" if scope is None else f"run{scope}"
    counts = row_counts(run_list, scope)
    with store.session() as s:  # the preview reads only the rows it shows
        tables = {name: (list(table(s, scope, PREVIEW_ROWS)), columns) for name, (table, columns) in TABLES.items()}
    columns = st.columns(3)
    for (name, (rows, _)), column in zip(tables.items(), columns, strict=True):
        column.metric(name.capitalize(), counts[name])
        column.download_button(
            f"{name}.csv",
            icon=":material/download:",
            data=partial(csv_of, store, name, scope),
            file_name=f"{name}-{suffix}.csv",
            mime="text/csv",
            key=f"ex_{name}",
            width="stretch",
            disabled=not rows,
            on_click="ignore",
        )
    st.markdown("**Preview**")
    for tab, (name, (rows, cols)) in zip(
        st.tabs([n.capitalize() for n in tables]), tables.items(), strict=True
    ):
        with tab:
            if rows:
                total = counts[name]
                shown = f"the first {len(rows)} of " if total > len(rows) else ""
                st.caption(f"{shown}{total} {'row' if total == 1 else 'rows'}")
                st.dataframe(rows[:PREVIEW_ROWS], hide_index=True, width="stretch", column_order=list(cols))
            else:
                st.caption(f"No {name} yet.")

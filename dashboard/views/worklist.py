"""Worklist page: the scans of a run sorted by score, filtered by status, flag, verdict and reviewer,
searchable by name; a click on a row (or the picker below) opens the scan in the viewer."""

from __future__ import annotations

from functools import partial
from typing import Any

import streamlit as st
from sqlalchemy import select

from anomaly.store import (
    UNREVIEWED,
    VERDICTS,
    Result,
    ResultRow,
    Review,
    RunSummary,
    Store,
    count_results,
    run_results,
)
from dashboard import state
from dashboard.views.common import empty_runs, fmt_score, selected_run

MAX_ROWS = 5000
"""Rows drawn at once; narrow the filters to see beyond."""

TABLE_NONCE = "_wl_table_nonce"


def reviewers(store: Store, run_id: int) -> list[str]:
    """Names of everyone who reviewed a result of the run, sorted."""
    stmt = (
        select(Review.reviewer)
        .join(Result, Result.id == Review.result_id)
        .where(Result.run_id == run_id)
        .distinct()
        .order_by(Review.reviewer)
    )
    with store.session() as s:
        return [name for (name,) in s.execute(stmt)]


def table_rows(rows: list[ResultRow]) -> list[dict[str, Any]]:
    """Rows for the worklist table, in the order given."""
    return [
        {
            "#": i + 1,
            "scan": r.scan_name,
            "score": r.score,
            "flagged": bool(r.flagged),
            "status": r.status,
            "findings": r.n_findings,
            "verdict": r.verdict or "",
            "reviewer": r.reviewer or "",
            "s": None if r.timing_s is None else round(r.timing_s, 2),
            "reason": r.error or "",
        }
        for i, r in enumerate(rows)
    ]


def _open(result_id: int) -> None:
    st.session_state[TABLE_NONCE] = st.session_state.get(TABLE_NONCE, 0) + 1
    state.go("Viewer", result_id)


def _on_select(table_key: str, result_ids: list[int]) -> None:
    """A row clicked in the table: open that scan (a callback, so the page can still change)."""
    value = st.session_state.get(table_key) or {}
    picked = list((value.get("selection") or {}).get("rows") or [])
    if picked and 0 <= picked[0] < len(result_ids):
        _open(result_ids[picked[0]])


def _open_picked() -> None:
    picked = st.session_state.get("wl_pick")
    if picked is not None:
        _open(int(picked))


def _clear_filters() -> None:
    for key in (state.STATUS, state.FLAG, state.VERDICT, state.BY, state.SEARCH):
        st.session_state[key] = state.DEFAULTS[key]


def _check_option(key: str, options: list[str]) -> None:
    if st.session_state.get(key) not in options:
        st.session_state[key] = options[0]


def filter_bar(store: Store, run_id: int) -> None:
    """The filter widgets; their values live in session state (see :func:`dashboard.state.filters`)."""
    verdicts = [state.ALL, UNREVIEWED, *VERDICTS]
    names = [state.ALL, *reviewers(store, run_id)]
    for key, options in (
        (state.STATUS, list(state.STATUS_OPTIONS)),
        (state.FLAG, list(state.FLAG_OPTIONS)),
        (state.VERDICT, verdicts),
        (state.BY, names),
        (state.ORDER, list(state.ORDER_LABELS)),
    ):
        _check_option(key, options)
    c = st.columns([2.2, 1, 1, 1.4, 1.2, 1.4, 0.8], vertical_alignment="bottom")
    c[0].text_input("Search scan name or path", key=state.SEARCH, placeholder="e.g. patient07")
    c[1].selectbox("Status", state.STATUS_OPTIONS, key=state.STATUS)
    c[2].selectbox("Flag", state.FLAG_OPTIONS, key=state.FLAG)
    c[3].selectbox("Verdict", verdicts, key=state.VERDICT)
    c[4].selectbox("Reviewer", names, key=state.BY)
    c[5].selectbox(
        "Sort by", list(state.ORDER_LABELS), key=state.ORDER, format_func=state.ORDER_LABELS.__getitem__
    )
    c[6].button("Clear", on_click=_clear_filters, key="wl_clear", width="stretch")


def render(store: Store, run_list: list[RunSummary]) -> None:
    """Draw the filters, the table of scans and the failed scans with their reasons."""
    st.header("Worklist")
    run = selected_run(run_list)
    if run is None:
        empty_runs()
        return
    if run.n_results == 0:
        st.info(f"Run {run.run_id} has no results yet; it may still be running. Reload in a moment.")
        return
    filter_bar(store, run.run_id)
    chosen = state.filters()
    with store.session() as s:
        total = count_results(s, run.run_id, **chosen.query())
        rows = run_results(s, run.run_id, **chosen.query(), order=chosen.order, limit=MAX_ROWS)
    st.caption(
        f"{total} of {run.n_results} scans of run {run.run_id} match"
        + (f"; showing the first {MAX_ROWS}" if total > MAX_ROWS else "")
        + ". Click a row to open it."
    )
    if not rows:
        st.info("No scan matches these filters.")
        return
    table_key = f"wl_table_{st.session_state.get(TABLE_NONCE, 0)}"
    st.dataframe(
        table_rows(rows),
        hide_index=True,
        width="stretch",
        height=min(38 + 35 * len(rows), 560),
        on_select=partial(_on_select, table_key, [r.result_id for r in rows]),
        selection_mode="single-row",
        key=table_key,
        column_config={
            "score": st.column_config.NumberColumn("score", format="%.4g"),
            "flagged": st.column_config.CheckboxColumn(
                "flagged", help="score at or above the scan threshold"
            ),
            "reason": st.column_config.TextColumn("failure reason", width="large"),
        },
    )

    labels = {
        r.result_id: f"{r.scan_name} · score {fmt_score(r.score)}" + (f" · {r.verdict}" if r.verdict else "")
        for r in rows
    }
    if st.session_state.get("wl_pick") not in labels:
        st.session_state["wl_pick"] = rows[0].result_id
    p1, p2 = st.columns([3, 1], vertical_alignment="bottom")
    p1.selectbox("Open a scan", list(labels), key="wl_pick", format_func=labels.__getitem__)
    p2.button(
        "Open in viewer",
        icon=":material/visibility:",
        key="wl_open",
        type="primary",
        on_click=_open_picked,
        width="stretch",
    )

    failed = [r for r in rows if r.status == "failed"]
    if failed:
        st.subheader(f"Failed scans ({len(failed)})")
        st.dataframe(
            [
                {"scan": r.scan_name, "input": r.input_path, "reason": r.error or "no reason recorded"}
                for r in failed
            ],
            hide_index=True,
            width="stretch",
            column_config={"reason": st.column_config.TextColumn("reason", width="large")},
        )

"""Worklist page: the scans of a run sorted by score, filtered by status, flag, verdict and reviewer,
searchable by name, a page at a time (keyset pages: a page reads only its own rows, however large the
run); a click on a row (or the picker below) opens the scan in the viewer."""

from __future__ import annotations

from functools import partial
from typing import Any

import streamlit as st

from anomaly.store import (
    UNREVIEWED,
    VERDICTS,
    Position,
    ResultRow,
    RunSummary,
    Store,
    count_results,
    result_page,
    reviewers,
)
from dashboard import state
from dashboard.views.common import empty_runs, fmt_score, selected_run

PAGE_SIZE = 50
"""Rows per worklist page."""
COUNT_LIMIT = 1000
"""Filtered counts stop here ("more than 1000 match"): counting costs one index entry per match."""
FAILED_SHOWN = 20
"""Failed scans listed with their reasons below the table."""

TABLE_NONCE = "_wl_table_nonce"
PAGES = "_wl_pages"
"""(what the pages are of, the start of each page walked so far): the way back for Previous page."""


def table_rows(rows: list[ResultRow], offset: int = 0) -> list[dict[str, Any]]:
    """Rows for the worklist table, in the order given (numbered from ``offset + 1``)."""
    return [
        {
            "#": offset + i + 1,
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
    with store.session() as s:
        names = [state.ALL, *reviewers(s, run_id)]
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


def _pages(signature: tuple[Any, ...]) -> list[Position | None]:
    """Starts of the pages walked so far under these filters (a new list when they change)."""
    ss = st.session_state
    held = ss.get(PAGES)
    if not held or held[0] != signature:
        held = (signature, [None])
        ss[PAGES] = held
    return list(held[1])


def _turn(signature: tuple[Any, ...], starts: list[Position | None]) -> None:
    st.session_state[PAGES] = (signature, starts)


def _count_caption(run: RunSummary, chosen: state.Filters, store: Store, page: int, shown: int) -> str:
    if chosen.query() == state.Filters().query():
        total = f"{run.n_results} scans of run {run.run_id}"
    else:
        with store.session() as s:
            n = count_results(s, run.run_id, **chosen.query(), most=COUNT_LIMIT)
        total = (f"more than {COUNT_LIMIT}" if n > COUNT_LIMIT else str(n)) + f" of {run.n_results} scans of run " \
            f"{run.run_id} match"
    first = (page - 1) * PAGE_SIZE + 1
    return f"{total}; page {page}, rows {first}-{first + shown - 1}. Click a row to open it."


def pager(signature: tuple[Any, ...], starts: list[Position | None], next_start: Position | None) -> None:
    """Previous page / Next page buttons (each page starts where the last one ended)."""
    c1, c2, _ = st.columns([1, 1, 4])
    c1.button("Previous page", icon=":material/chevron_left:", key="wl_prev_page", disabled=len(starts) < 2,
              on_click=_turn, args=(signature, starts[:-1]), width="stretch")
    c2.button("Next page", icon=":material/chevron_right:", key="wl_next_page", disabled=next_start is None,
              on_click=_turn, args=(signature, [*starts, next_start]), width="stretch")


def failed_list(store: Store, run: RunSummary) -> None:
    """The run's failed scans with their reasons (the first few; the status filter lists them all)."""
    if not run.n_failed:
        return
    with store.session() as s:
        # failed scans have no score: the status index then walks them in the order they were scored
        failed = result_page(s, run.run_id, order="score_desc", status="failed", size=FAILED_SHOWN).rows
    more = f", the first {FAILED_SHOWN} (filter by status to see all)" if run.n_failed > FAILED_SHOWN else ""
    st.subheader(f"Failed scans ({run.n_failed}{more})")
    st.dataframe(
        [{"scan": r.scan_name, "input": r.input_path, "reason": r.error or "no reason recorded"} for r in failed],
        hide_index=True,
        width="stretch",
        column_config={"reason": st.column_config.TextColumn("reason", width="large")},
    )


def render(store: Store, run_list: list[RunSummary]) -> None:
    """Draw the filters, one page of the table of scans and the failed scans with their reasons."""
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
    signature = (run.run_id, chosen)
    starts = _pages(signature)
    with store.session() as s:
        page = result_page(s, run.run_id, **chosen.query(), order=chosen.order, start=starts[-1], size=PAGE_SIZE)
    rows = page.rows
    if not rows:
        st.info("No scan matches these filters.")
        failed_list(store, run)
        return
    st.caption(_count_caption(run, chosen, store, len(starts), len(rows)))
    table_key = f"wl_table_{st.session_state.get(TABLE_NONCE, 0)}"
    offset = (len(starts) - 1) * PAGE_SIZE
    st.dataframe(
        table_rows(rows, offset),
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
    if len(starts) > 1 or page.next_start is not None:
        pager(signature, starts, page.next_start)

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
    failed_list(store, run)

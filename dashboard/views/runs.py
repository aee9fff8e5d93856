"""Runs page: every scoring run with model, calibration, counts (scored, failed, flagged, reviewed) and timing."""

from __future__ import annotations

from functools import partial

import streamlit as st

from anomaly.store import UNREVIEWED, RunSummary, Store, result_page
from dashboard import state
from dashboard.views.common import duration, empty_runs, fmt_time, selected_run

TABLE_NONCE = "_runs_table_nonce"


def _on_select(table_key: str, run_ids: list[int]) -> None:
    """A row clicked in the runs table makes that run the current one."""
    picked = list(((st.session_state.get(table_key) or {}).get("selection") or {}).get("rows") or [])
    if picked and 0 <= picked[0] < len(run_ids) and st.session_state.get(state.RUN) != run_ids[picked[0]]:
        st.session_state[state.RUN] = run_ids[picked[0]]
        st.session_state[state.RESULT] = None
    st.session_state[TABLE_NONCE] = st.session_state.get(TABLE_NONCE, 0) + 1


def _open_worklist(run_id: int) -> None:
    st.session_state[state.RUN] = run_id
    state.go("Worklist")


def _review_next(run_id: int, result_id: int) -> None:
    st.session_state[state.RUN] = run_id
    state.go("Viewer", result_id)


def render(store: Store, run_list: list[RunSummary]) -> None:
    """Draw the runs table and shortcuts into the chosen run."""
    st.header("Runs")
    if not run_list:
        empty_runs()
        return
    rows = [
        {
            "run": r.run_id,
            "model": r.model_name,
            "calibration": r.calibration or "—",
            "scans": r.n_results,
            "scored": r.n_ok,
            "failed": r.n_failed,
            "flagged": r.n_flagged,
            "reviewed": r.n_reviewed,
            "skipped": r.n_skipped,
            "s / scan": None if r.mean_timing_s is None else round(r.mean_timing_s, 2),
            "started": fmt_time(r.started_at),
            "wall time": duration(r.started_at, r.finished_at),
            "executor": r.executor,
            "output folder": r.out_dir,
        }
        for r in run_list
    ]
    table_key = f"runs_table_{st.session_state.get(TABLE_NONCE, 0)}"
    st.dataframe(
        rows,
        hide_index=True,
        width="stretch",
        key=table_key,
        selection_mode="single-row",
        on_select=partial(_on_select, table_key, [r.run_id for r in run_list]),
    )
    run = selected_run(run_list) or run_list[0]
    st.subheader(f"Run {run.run_id}")
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Scored", run.n_ok)
    c2.metric("Failed", run.n_failed)
    c3.metric("Flagged", run.n_flagged)
    c4.metric("Reviewed", f"{run.n_reviewed} / {run.n_ok}")
    with store.session() as s:
        first = result_page(s, run.run_id, status="ok", verdict=UNREVIEWED, order="score_desc", size=1).rows
    b1, b2, _ = st.columns([1, 1, 2])
    b1.button(
        "Open worklist",
        icon=":material/list:",
        key="runs_open",
        on_click=_open_worklist,
        args=(run.run_id,),
        width="stretch",
    )
    if first:
        b2.button(
            "Review highest unreviewed",
            icon=":material/visibility:",
            key="runs_review",
            type="primary",
            width="stretch",
            on_click=_review_next,
            args=(run.run_id, first[0].result_id),
        )
    else:
        b2.success("Every scored scan of this run is reviewed.")
    st.caption("Click a row (or use the sidebar) to pick another run.")

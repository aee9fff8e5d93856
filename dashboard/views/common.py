"""Small pieces shared by pages: empty states, run lookup and number formatting."""

from __future__ import annotations

from datetime import datetime

import streamlit as st

from anomaly.store import RunSummary

NO_RUNS = (
    "No runs yet. Score scans into this database first, e.g. "
    "`anomaly score scans/ --out results/maps --db results/anomaly.db`, then reload this page."
)


def empty_runs() -> None:
    """The empty state shown by every page when the database holds no run."""
    st.info(NO_RUNS, icon=":material/info:")


def selected_run(run_list: list[RunSummary]) -> RunSummary | None:
    """The run picked in the sidebar, or None when there is none."""
    run_id = st.session_state.get("run_id")
    return next((r for r in run_list if r.run_id == run_id), None)


def fmt_score(value: float | None) -> str:
    """A score with four significant digits, a dash when missing."""
    return "—" if value is None else f"{value:.4g}"


def fmt_time(value: datetime | None) -> str:
    """A timestamp to the minute, a dash when missing."""
    return "—" if value is None else f"{value:%Y-%m-%d %H:%M}"


def duration(start: datetime | None, end: datetime | None) -> str:
    """A run's wall time as ``1 h 02 min`` / ``3 min 05 s`` / ``12 s``; ``running`` when unfinished."""
    if start is None or end is None:
        return "running or interrupted"
    seconds = max(0, int((end - start).total_seconds()))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"

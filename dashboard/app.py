"""Streamlit entry point of the review dashboard: ``streamlit run dashboard/app.py`` with the database
URL in ``ANOMALY_DB`` (``anomaly dashboard --db URL`` does both). Pages: runs, worklist, scan viewer
with review, calibration and export; all data goes through :mod:`anomaly.store`."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source tree: make the package importable
    _ROOT = str(Path(__file__).resolve().parents[1])
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)

import streamlit as st  # noqa: E402

from anomaly.store import RunSummary, Store, list_runs, run_of_result  # noqa: E402
from dashboard import state  # noqa: E402
from dashboard.db import database_url, get_store  # noqa: E402
from dashboard.text import plain  # noqa: E402
from dashboard.views import calibration, export, runs, viewer, worklist  # noqa: E402

VIEWS = {
    "Runs": runs.render,
    "Worklist": worklist.render,
    "Viewer": viewer.render,
    "Calibration": calibration.render,
    "Export": export.render,
}
ICONS = {
    "Runs": ":material/folder_open:",
    "Worklist": ":material/list:",
    "Viewer": ":material/visibility:",
    "Calibration": ":material/tune:",
    "Export": ":material/download:",
}


def run_label(run: RunSummary) -> str:
    """How a run is named in pickers: id, model, calibration and start date."""
    calibration_ref = f" · {run.calibration}" if run.calibration else ""
    return f"Run {run.run_id} · {run.model_name}{calibration_ref} · {run.started_at:%Y-%m-%d %H:%M}"


def align_run(store: Store) -> None:
    """Show the run of the scan in view (e.g. a shared ``?result=`` link); forget a scan that is gone."""
    ss = st.session_state
    result_id = ss.get(state.RESULT)
    if result_id is None:
        return
    with store.session() as s:
        run_id = run_of_result(s, int(result_id))
    if run_id is None:
        ss[state.RESULT] = None
    elif ss.get(state.RUN) != run_id:
        ss[state.RUN] = run_id


def _run_changed() -> None:
    st.session_state[state.RESULT] = None


def sidebar(store: Store, run_list: list[RunSummary]) -> None:
    """Navigation, run picker, reviewer name and review progress."""
    ss = st.session_state
    with st.sidebar:
        st.markdown("### :material/neurology: Brain anomaly review")
        if ss.get(state.PAGE) not in state.PAGES:
            ss[state.PAGE] = state.PAGES[0]
        st.radio("Page", state.PAGES, key=state.PAGE, format_func=lambda p: f"{ICONS[p]} {p}")
        if run_list:
            labels = {r.run_id: run_label(r) for r in run_list}
            if ss.get(state.RUN) not in labels:
                ss[state.RUN] = run_list[0].run_id
            st.selectbox(
                "Run", list(labels), key=state.RUN, format_func=labels.__getitem__, on_change=_run_changed
            )
        else:
            ss[state.RUN] = None
        st.text_input(
            "Reviewer", key=state.REVIEWER, placeholder="your name", help="Recorded with every verdict."
        )
        current = next((r for r in run_list if r.run_id == ss.get(state.RUN)), None)
        if current is not None:  # the run's counts are kept on write: no result is read here
            done, total = current.n_reviewed, current.n_ok
            st.progress(done / total if total else 0.0, text=f"Reviewed {done} of {total} scored scans")
        st.caption(f"Database: {plain(store.url)}")


def main() -> None:
    """Set up the page, open the store, draw the sidebar and the chosen page."""
    st.set_page_config(page_title="Brain anomaly review", layout="wide")
    state.keep(viewer.PERSISTENT_KEYS + calibration.PERSISTENT_KEYS)
    state.load_query()
    try:
        store = get_store()
        with store.session() as s:
            run_list = list_runs(s)
    except Exception as exc:  # noqa: BLE001 - shown to the user with what to do
        st.error(
            f"Cannot open the database `{database_url()}`: {exc}\n\n"
            "Start the dashboard on a valid database, e.g. `anomaly dashboard --db results/anomaly.db`, "
            "or set `ANOMALY_DB` to a SQLAlchemy URL."
        )
        st.stop()
    align_run(store)
    sidebar(store, run_list)
    state.show_flash()
    VIEWS[st.session_state[state.PAGE]](store, run_list)
    state.write_query()


main()

"""Session state of the dashboard: the page, run and scan in view, worklist filters and the reviewer,
kept across pages and mirrored in the URL (``?page=viewer&run=3&result=41``) so a view can be shared."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import streamlit as st

from anomaly.store import UNREVIEWED

PAGES: tuple[str, ...] = ("Runs", "Worklist", "Viewer", "Calibration", "Export")
"""Pages in sidebar order."""

PAGE = "page"
RUN = "run_id"
RESULT = "result_id"
REVIEWER = "reviewer"
FLASH = "flash"

STATUS = "wl_status"
FLAG = "wl_flag"
VERDICT = "wl_verdict"
BY = "wl_reviewer"
SEARCH = "wl_search"
ORDER = "wl_order"
UNREVIEWED_ONLY = "vw_unreviewed_only"

ALL = "all"
FLAG_OPTIONS: tuple[str, ...] = (ALL, "flagged", "not flagged")
STATUS_OPTIONS: tuple[str, ...] = (ALL, "ok", "failed")
ORDER_LABELS: dict[str, str] = {
    "score_desc": "score, highest first",
    "score_asc": "score, lowest first",
    "name": "name, A to Z",
    "name_desc": "name, Z to A",
    "recent": "most recently scored",
    "timing_desc": "slowest first",
}

DEFAULTS: dict[str, Any] = {
    STATUS: ALL,
    FLAG: ALL,
    VERDICT: ALL,
    BY: ALL,
    SEARCH: "",
    ORDER: "score_desc",
    REVIEWER: "",
    UNREVIEWED_ONLY: False,
}

PERSISTENT: tuple[str, ...] = (PAGE, RUN, RESULT, *DEFAULTS)
"""Keys kept when the page holding their widget is not shown (Streamlit drops unseen widget state)."""


def keep(extra: tuple[str, ...] = ()) -> None:
    """Fill defaults and re-assign persistent keys (and ``extra`` widget keys of pages) so they survive
    runs that do not draw their widgets."""
    state = st.session_state
    for key, value in DEFAULTS.items():
        if key not in state:
            state[key] = value
    for key in (*PERSISTENT, *extra):
        if key in state:
            state[key] = state[key]


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def load_query() -> None:
    """Take page, run and result from the URL once per session (later changes come from the widgets)."""
    state = st.session_state
    if state.get("_query_loaded"):
        return
    state["_query_loaded"] = True
    params = st.query_params
    page = str(params.get("page", "")).strip().lower()
    for name in PAGES:
        if name.lower() == page:
            state[PAGE] = name
    run = _int(params.get("run"))
    if run is not None:
        state[RUN] = run
    result = _int(params.get("result"))
    if result is not None:
        state[RESULT] = result


def write_query() -> None:
    """Mirror the page, run and result into the URL."""
    state = st.session_state
    wanted = {"page": str(state.get(PAGE, PAGES[0])).lower()}
    if state.get(RUN) is not None:
        wanted["run"] = str(state[RUN])
    if state.get(PAGE) == "Viewer" and state.get(RESULT) is not None:
        wanted["result"] = str(state[RESULT])
    if dict(st.query_params) != wanted:
        st.query_params.from_dict(wanted)


def go(page: str, result_id: int | None = None) -> None:
    """Switch page (and scan); safe inside widget callbacks."""
    st.session_state[PAGE] = page
    if result_id is not None:
        st.session_state[RESULT] = int(result_id)


def flash(message: str, kind: str = "success") -> None:
    """A message shown once at the top of the next page drawn."""
    st.session_state[FLASH] = (kind, message)


def show_flash() -> None:
    """Show (and forget) the message left by :func:`flash`."""
    item = st.session_state.pop(FLASH, None)
    if item:
        kind, message = item
        getattr(st, kind, st.info)(message)


@dataclass(frozen=True)
class Filters:
    """The worklist filters as keyword arguments of ``run_results``, ``count_results`` and ``neighbours``."""

    status: str | None = None
    flagged: bool | None = None
    verdict: str | None = None
    reviewer: str | None = None
    search: str | None = None
    order: str = "score_desc"

    def query(self) -> dict[str, Any]:
        """Keyword arguments of the store's listing functions (without the order)."""
        return {
            "status": self.status,
            "flagged": self.flagged,
            "verdict": self.verdict,
            "reviewer": self.reviewer,
            "search": self.search,
        }

    def stepping(self, unreviewed_only: bool) -> dict[str, Any]:
        """Filters for next/previous: the worklist's, narrowed to unreviewed scans when asked."""
        values = self.query()
        if unreviewed_only:
            values["verdict"] = UNREVIEWED
        return values


def filters() -> Filters:
    """The worklist filters currently chosen."""
    state = st.session_state
    flag = state.get(FLAG, ALL)
    search = str(state.get(SEARCH, "") or "").strip()
    order = state.get(ORDER, "score_desc")
    return Filters(
        status=None if state.get(STATUS, ALL) == ALL else state[STATUS],
        flagged=None if flag == ALL else flag == "flagged",
        verdict=None if state.get(VERDICT, ALL) == ALL else state[VERDICT],
        reviewer=None if state.get(BY, ALL) == ALL else state[BY],
        search=search or None,
        order=order if order in ORDER_LABELS else "score_desc",
    )

"""Review panel of the viewer: verdict, note and reviewer saved through ``add_review``, then on to the
next scan without going back to the list; the scan's review history."""

from __future__ import annotations

from typing import Any

import streamlit as st

from anomaly.store import VERDICTS, ResultDetail, Store, add_review, neighbours
from dashboard import state
from dashboard.text import plain

VERDICT = "rv_verdict"
NOTE = "rv_note"
VERDICT_HELP = {
    "confirmed finding": "a real abnormality the map points at",
    "false positive": "the map flags normal tissue",
    "artefact": "motion, field inhomogeneity, registration or skull-stripping problem",
    "normal": "nothing abnormal in the scan",
    "unsure": "needs a second opinion",
}


def reset(detail: ResultDetail) -> None:
    """Form values for a newly opened scan: its current verdict, an empty note."""
    latest = detail.latest_review
    st.session_state[VERDICT] = latest.verdict if latest is not None else None
    st.session_state[NOTE] = ""


def save(
    store: Store,
    run_id: int,
    result_id: int,
    scan_name: str,
    go_next: bool,
    order: str,
    stepping: dict[str, Any],
) -> None:
    """Write the review from the form (a widget callback); with ``go_next`` open the next scan."""
    ss = st.session_state
    reviewer = str(ss.get(state.REVIEWER, "") or "").strip()
    verdict = ss.get(VERDICT)
    if not reviewer:
        state.flash(
            "Enter your name in the sidebar's **Reviewer** box, then save the verdict again.", "warning"
        )
        return
    if verdict not in VERDICTS:
        state.flash("Pick a verdict before saving.", "warning")
        return
    note = str(ss.get(NOTE, "") or "").strip()
    with store.session() as s:
        add_review(s, result_id, reviewer, verdict, note)
    message = f"Saved **{verdict}** for {plain(scan_name)} (reviewer {plain(reviewer)})."
    if go_next:
        with store.session() as s:
            _, next_id = neighbours(s, run_id, result_id, order, **stepping)
        if next_id is None:
            message += " That was the last scan in this list."
        else:
            ss[state.RESULT] = next_id
    state.flash(message)


def panel(store: Store, run_id: int, detail: ResultDetail, order: str, stepping: dict[str, Any]) -> None:
    """The review form with Save and Save & next, plus the history of verdicts."""
    if VERDICT not in st.session_state:
        reset(detail)
    latest = detail.latest_review
    st.markdown("#### Review")
    if latest is not None:
        st.caption(
            f"Current verdict: **{latest.verdict}** by {plain(latest.reviewer)}, {latest.created_at:%Y-%m-%d %H:%M} UTC"
        )
    else:
        st.caption("Not reviewed yet.")
    args = (store, run_id, detail.result.id, detail.scan.name)
    with st.form("review_form", border=False):
        st.radio(
            "Verdict", VERDICTS, key=VERDICT, index=None, captions=[VERDICT_HELP.get(v, "") for v in VERDICTS]
        )
        st.text_area("Note", key=NOTE, height=80, placeholder="optional: what you see, where, why")
        c1, c2 = st.columns(2)
        c1.form_submit_button(
            "Save",
            icon=":material/save:",
            on_click=save,
            args=(*args, False, order, stepping),
            width="stretch",
        )
        c2.form_submit_button(
            "Save & next",
            icon=":material/skip_next:",
            type="primary",
            on_click=save,
            args=(*args, True, order, stepping),
            width="stretch",
        )
    if not str(st.session_state.get(state.REVIEWER, "") or "").strip():
        st.caption(":material/warning: Enter your name in the sidebar (Reviewer) to save verdicts.")
    if detail.reviews:
        with st.expander(f"History ({len(detail.reviews)})"):
            for review in reversed(detail.reviews):
                note = f": {plain(review.note)}" if review.note else ""
                st.markdown(
                    f"- {review.created_at:%Y-%m-%d %H:%M} **{review.verdict}** by {plain(review.reviewer)}{note}"
                )

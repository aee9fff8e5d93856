"""User text on the dashboard is plain text: a note or scan name never becomes a link, image or heading."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402
from test_dashboard_data import FilledDB, build_filled_db  # noqa: E402

from anomaly.store import Result, Scan, add_review, open_store  # noqa: E402
from dashboard.text import plain  # noqa: E402

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
TRACKER = "![t](http://host/track.png)"


def test_plain_escapes_every_markdown_construct() -> None:
    assert plain(TRACKER) == r"\!\[t\]\(http\:\/\/host\/track\.png\)"
    assert plain("# title\n- item <b>x</b> $x$ :red[y] `z`") == (
        r"\# title \- item \<b\>x\<\/b\> \$x\$ \:red\[y\] \`z\`")
    assert plain("plain words") == "plain words"


def test_notes_reviewers_and_scan_names_render_as_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db: FilledDB = build_filled_db(tmp_path)
    monkeypatch.setenv("ANOMALY_DB", db.url)
    store = open_store(db.url)
    with store.session() as s:
        result_id = db.ok_ids[0]
        add_review(s, result_id, "eve [x](http://host/r)", "unsure", f"look {TRACKER} here")
        scan = s.get(Scan, s.scalar(select(Result.scan_id).where(Result.id == result_id)))
        scan.name = "## ![s](http://host/scan.png)"
    store.close()
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["page"] = "viewer"
    at.query_params["result"] = str(result_id)
    at.run()
    assert not at.exception
    shown = [m.value for m in at.markdown] + [c.value for c in at.caption]
    assert any(plain(TRACKER) in text for text in shown)  # the note is there, as text
    for text in shown:
        assert "](http://host" not in text, text  # no link or image syntax left for the browser

"""End to end in headless Chromium: the real ``streamlit run dashboard/app.py`` on a filled database;
open a scan from the worklist, move the overlay threshold, save a verdict, read it back from the
database, open the NiiVue view (served offline) and save a screenshot."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from test_dashboard_data import FilledDB, build_filled_db

from anomaly.store import Review, open_store

CHROMIUM = os.environ.get("ANOMALY_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not Path(CHROMIUM).is_file(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    ),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, FilledDB]]:
    """The dashboard on a free localhost port, on a filled database; stopped afterwards."""
    db = build_filled_db(tmp_path / "data")
    port = _free_port()
    env = dict(os.environ, ANOMALY_DB=db.url, PYTHONPATH=str(REPO))
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(REPO / "dashboard" / "app.py"),
        "--server.port",
        str(port),
        "--server.address",
        "127.0.0.1",
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
    ]
    log = open(tmp_path / "streamlit.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"streamlit did not start: {(tmp_path / 'streamlit.log').read_text()[-2000:]}")
            time.sleep(0.25)
        yield url, db
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_review_a_scan_in_a_real_browser(server: tuple[str, FilledDB], tmp_path: Path) -> None:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="pip install playwright (no browser download needed)"
    )
    url, db = server
    shots = Path(os.environ.get("ANOMALY_SCREENSHOTS", tmp_path / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    external: list[str] = []
    profile = tmp_path / "chromium-profile"
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1500, "height": 1200},
        )
        try:
            page = context.new_page()
            page.set_default_timeout(20_000)
            page.on(
                "request",
                lambda r: (
                    external.append(r.url)
                    if not r.url.startswith(("http://127.0.0.1", "data:", "blob:", "about:"))
                    else None
                ),
            )
            expect = sync_api.expect

            # worklist -> open the top-scoring scan
            page.goto(f"{url}/?page=worklist&run={db.run_id}")
            page.get_by_role("button", name="Open in viewer").click()
            expect(page.get_by_role("heading", name="patient02")).to_be_visible()
            expect(page.get_by_text("axial · slice 21 of 48")).to_be_visible()

            # move the overlay threshold: the overlay picture must change
            axial = page.get_by_test_id("stImage").first.locator("img")
            before = axial.get_attribute("src")
            thumb = page.get_by_test_id("stSlider").filter(has_text="Overlay threshold").get_by_role("slider")
            expect(thumb).to_have_value("0.5")
            thumb.focus()
            thumb.press("End")  # one key press, one rerun: to the top of the map's range
            expect(thumb).to_have_value("0.95")
            expect(axial).not_to_have_attribute("src", before or "")

            # reviewer, verdict, note, save & next
            name = page.get_by_test_id("stSidebar").get_by_label("Reviewer", exact=True)
            name.fill("dr. browser")
            name.press("Enter")
            page.get_by_text("confirmed finding", exact=True).first.click()
            page.get_by_label("Note").fill("bright round lesion, right putamen")
            page.get_by_role("button", name="Save & next").click()
            expect(page.get_by_text("Saved confirmed finding for patient02")).to_be_visible()
            expect(page.get_by_role("heading", name="patient00")).to_be_visible()

            store = open_store(db.url)
            with store.session() as s:
                rows = [(r.result_id, r.reviewer, r.verdict, r.note) for r in s.scalars(select(Review))]
            store.close()
            assert rows == [
                (db.ok_ids[0], "dr. browser", "confirmed finding", "bright round lesion, right putamen")
            ]

            # the NiiVue view comes from the app's own component files
            page.get_by_text("Interactive 3D view (NiiVue)").click()
            frame = page.frame_locator("iframe[title*='anomaly_niivue']")
            expect(frame.locator("body[data-status]")).to_have_attribute(
                "data-status",
                re.compile(r"^(ready|3D view unavailable: this browser offers no WebGL2)$"),
                timeout=30_000,
            )
            page.get_by_text("Interactive 3D view (NiiVue)").scroll_into_view_if_needed()
            page.screenshot(path=str(shots / "viewer-3d.png"))
            page.get_by_role("heading", name="patient00").scroll_into_view_if_needed()
            page.screenshot(path=str(shots / "viewer.png"))

            # export: the reviews CSV holds the verdict just saved
            page.get_by_test_id("stSidebar").get_by_test_id("stRadioOption").filter(has_text="Export").click()
            with page.expect_download() as download:
                page.get_by_role("button", name="reviews.csv").click()
            text = Path(download.value.path()).read_text()
            assert "dr. browser,confirmed finding" in text and "bright round lesion" in text
        finally:
            context.close()
    assert external == [], f"the dashboard reached outside localhost: {external}"
    assert (shots / "viewer.png").stat().st_size > 10_000
    shutil.rmtree(profile, ignore_errors=True)

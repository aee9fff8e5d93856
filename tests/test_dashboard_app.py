"""Page logic of the dashboard with ``streamlit.testing.v1.AppTest`` on real SQLite databases and NIfTI files."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from sqlalchemy import select

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402
from test_dashboard_data import SCAN_THRESHOLD, VOXEL_THRESHOLD, FilledDB, build_filled_db  # noqa: E402

from anomaly.store import (  # noqa: E402
    REVIEW_COLUMNS,
    Calibration,
    Review,
    add_review,
    open_store,
    reviews_table,
)
from anomaly.viz import to_canonical  # noqa: E402
from dashboard.state import PAGES  # noqa: E402
from dashboard.views.common import NO_RUNS  # noqa: E402
from dashboard.views.export import to_csv  # noqa: E402
from dashboard.views.viewer import AXIS_KEYS  # noqa: E402

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")


@pytest.fixture
def filled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FilledDB:
    db = build_filled_db(tmp_path)
    monkeypatch.setenv("ANOMALY_DB", db.url)
    return db


def app(**query: object) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    for key, value in query.items():
        at.query_params[key] = str(value)
    return at.run()


def go(at: AppTest, page: str) -> AppTest:
    return at.sidebar.radio[0].set_value(page).run()


def no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def reviews(db: FilledDB) -> list[Review]:
    store = open_store(db.url)
    with store.session() as s:
        rows = list(s.scalars(select(Review).order_by(Review.id)))
    store.close()
    return rows


def save_and_next(at: AppTest, verdict: str, note: str = "") -> AppTest:
    at.radio(key="rv_verdict").set_value(verdict)
    at.text_area(key="rv_note").input(note)
    next(b for b in at.button if b.label == "Save & next").click()
    return at.run()


# ----------------------------------------------------------------------------------------- empty database


def test_every_page_renders_on_an_empty_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANOMALY_DB", str(tmp_path / "empty.db"))
    at = app()
    for page in PAGES:
        go(at, page)
        no_errors(at)
        assert [i.value for i in at.info] == [NO_RUNS], page
    assert (tmp_path / "empty.db").is_file()


def test_an_unopenable_database_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "a-folder"
    folder.mkdir()
    monkeypatch.setenv("ANOMALY_DB", str(folder))
    at = app()
    assert not at.exception
    assert "Cannot open the database" in at.error[0].value and "is a folder" in at.error[0].value


# ----------------------------------------------------------------------------------------- filled database


def test_every_page_renders_for_each_run(filled: FilledDB) -> None:
    at = app()
    for run_id in (filled.run_id, filled.other_run_id):
        at.sidebar.selectbox[0].set_value(run_id).run()
        for page in PAGES:
            go(at, page)
            no_errors(at)
            assert at.session_state["run_id"] == run_id


def test_runs_page_lists_runs_with_counts(filled: FilledDB) -> None:
    at = app()
    table = at.dataframe[0].value
    assert list(table["run"]) == [filled.other_run_id, filled.run_id]
    main = table[table["run"] == filled.run_id].iloc[0]
    assert (main["scored"], main["failed"], main["reviewed"], main["calibration"]) == (4, 1, 0, "healthy@1")
    at.sidebar.selectbox[0].set_value(filled.run_id).run()
    at.button(key="runs_review").click().run()
    assert at.session_state["page"] == "Viewer" and at.session_state["result_id"] == filled.ok_ids[0]


def test_worklist_sorts_filters_and_lists_failures(filled: FilledDB) -> None:
    at = app(page="worklist", run=filled.run_id)
    no_errors(at)
    table = at.dataframe[0].value
    assert len(table) == 5
    scores = [s for s in table["score"] if s == s]
    assert scores == sorted(scores, reverse=True)
    assert table["flagged"].iloc[0] and bool(table["scan"].iloc[-1] == "broken")
    failed = at.dataframe[1].value
    assert list(failed["scan"]) == ["broken"] and "not a NIfTI file" in failed["reason"].iloc[0]

    at.selectbox(key="wl_status").set_value("failed").run()
    assert list(at.dataframe[0].value["scan"]) == ["broken"]
    at.button(key="wl_clear").click().run()
    at.text_input(key="wl_search").input("patient01").run()
    assert list(at.dataframe[0].value["scan"]) == ["patient01"]
    at.button(key="wl_clear").click().run()
    at.selectbox(key="wl_order").set_value("name").run()
    assert list(at.dataframe[0].value["scan"])[:2] == ["broken", "patient00"]
    at.selectbox(key="wl_flag").set_value("flagged").run()
    assert all(at.dataframe[0].value["flagged"])
    at.selectbox(key="wl_pick").set_value(filled.ok_ids[1]).run()
    at.button(key="wl_open").click().run()
    no_errors(at)
    assert at.session_state["page"] == "Viewer" and at.session_state["result_id"] == filled.ok_ids[1]


def test_worklist_filters_by_verdict_and_reviewer(filled: FilledDB) -> None:
    store = open_store(filled.url)
    with store.session() as s:
        add_review(s, filled.ok_ids[0], "alice", "confirmed finding")
        add_review(s, filled.ok_ids[1], "bob", "normal")
    store.close()
    at = app(page="worklist", run=filled.run_id)
    at.selectbox(key="wl_verdict").set_value("normal").run()
    assert len(at.dataframe[0].value) == 1 and at.dataframe[0].value["reviewer"].iloc[0] == "bob"
    at.selectbox(key="wl_verdict").set_value("unreviewed").run()
    assert len(at.dataframe[0].value) == 3
    at.selectbox(key="wl_verdict").set_value("all").run()
    assert at.selectbox(key="wl_reviewer").options == ["all", "alice", "bob"]
    at.selectbox(key="wl_reviewer").set_value("alice").run()
    assert list(at.dataframe[0].value["verdict"]) == ["confirmed finding"]


def test_viewer_opens_the_top_scan_with_the_calibrated_threshold(filled: FilledDB) -> None:
    at = app(page="viewer", run=filled.run_id)
    no_errors(at)
    assert at.session_state["result_id"] == filled.ok_ids[0]
    assert at.slider(key="vw_threshold").value == pytest.approx(VOXEL_THRESHOLD)
    captions = [image.proto.imgs[0].caption for image in at.get("image")]
    assert captions[:3] == ["axial · slice 21 of 48", "coronal · slice 32 of 48", "sagittal · slice 36 of 48"]
    assert captions[3:5] == ["input", "reconstruction"] and captions[5].startswith("residual")
    assert "Right Putamen" in at.dataframe[0].value["region"].iloc[0]
    # crosshair starts on the first finding's peak, inside the lesion
    position = tuple(at.session_state[k] for k in AXIS_KEYS)
    lesion_mm = filled.lesion_centre_mm[filled.ok_ids[0]]
    image = nib.load(str(filled.out_dir / "patient02_anomaly.nii.gz"))
    canon = to_canonical(np.asarray(image.dataobj), image.affine)
    assert np.linalg.norm(np.subtract(canon.voxel_to_world(position), lesion_mm)) <= 4.5
    at.selectbox(key="vw_jump").set_value("centre").run()
    assert tuple(at.session_state[k] for k in AXIS_KEYS) == (24, 24, 24)
    at.slider(key="vw_threshold").set_value(0.8).run()
    no_errors(at)
    go(at, "Worklist")
    go(at, "Viewer")
    assert at.slider(key="vw_threshold").value == pytest.approx(0.8)  # kept across pages
    assert tuple(at.session_state[k] for k in AXIS_KEYS) == (24, 24, 24)
    at.toggle(key="vw_mask_outline").set_value(True).run()  # reads the stored mask too
    no_errors(at)
    at.slider(key="vw_window").set_value(10.0).run()
    at.button(key="vw_auto_window").click().run()
    assert at.slider(key="vw_window").value > 10.0


def test_viewer_outlines_the_brain_mask_written_beside_the_map(filled: FilledDB) -> None:
    from anomaly.store import get_result_detail
    from anomaly.viz import BRAIN_COLOR, render_plane
    from dashboard.views.viewer import SHOW_BRAIN, load_scan

    at = app(page="viewer", run=filled.run_id)
    no_errors(at)
    assert at.toggle(key=SHOW_BRAIN).value is True  # on by default
    at.toggle(key=SHOW_BRAIN).set_value(False).run()
    no_errors(at)
    store = open_store(filled.url)
    with store.session() as s:
        detail = get_result_detail(s, filled.ok_ids[0])
    store.close()
    vols = load_scan(detail, with_brain=True)
    assert vols.brain is not None and vols.brain.volume.shape == vols.anomaly.volume.shape
    assert load_scan(detail).brain is None
    picture = render_plane(vols.input.volume, "axial", 24, window=vols.input.window, brain=vols.brain.volume)
    assert (picture == np.array(BRAIN_COLOR, np.uint8)).all(axis=-1).sum() > 50


def test_viewer_refuses_a_map_outside_the_run_folder(filled: FilledDB) -> None:
    at = app(page="viewer", run=filled.other_run_id)
    assert not at.exception
    assert any("outside the run's output folder" in w.value for w in at.warning)


def test_shared_link_opens_the_scan_in_its_run(filled: FilledDB) -> None:
    at = app(page="viewer", result=filled.ok_ids[2])
    no_errors(at)
    assert at.session_state["run_id"] == filled.run_id and at.session_state["result_id"] == filled.ok_ids[2]
    at.button(key="vw_next").click().run()
    assert at.session_state["result_id"] == filled.ok_ids[3]
    assert str(at.query_params["result"]).strip("[]'") == str(filled.ok_ids[3])  # the URL follows the scan


def test_failed_scan_shows_its_reason(filled: FilledDB) -> None:
    at = app(page="viewer", result=filled.failed_id)
    assert not at.exception
    assert "not a NIfTI file" in at.error[0].value


def test_saving_a_review_writes_the_row_and_moves_on(filled: FilledDB) -> None:
    at = app(page="viewer", run=filled.run_id)
    save_and_next(at, "confirmed finding", "round bright lesion")
    assert reviews(filled) == []  # no reviewer name yet: nothing written
    assert "Reviewer" in at.warning[0].value

    at.sidebar.text_input[0].input("dr. alice").run()
    save_and_next(at, "confirmed finding", "round bright lesion")
    no_errors(at)
    rows = reviews(filled)
    assert [(r.result_id, r.reviewer, r.verdict, r.note) for r in rows] == [
        (filled.ok_ids[0], "dr. alice", "confirmed finding", "round bright lesion")
    ]
    assert at.session_state["result_id"] == filled.ok_ids[1]
    assert "Saved" in at.success[0].value
    assert "Reviewed 1 of 4" in at.sidebar.get("progress")[0].proto.text

    next(b for b in at.button if b.label == "Save").click()
    at.radio(key="rv_verdict").set_value("normal")
    at.run()
    assert reviews(filled)[-1].verdict == "normal" and at.session_state["result_id"] == filled.ok_ids[1]


def test_threshold_resets_per_scan_unless_the_reader_keeps_it(filled: FilledDB) -> None:
    at = app(page="viewer", run=filled.run_id)
    at.slider(key="vw_threshold").set_value(0.8).run()
    at.button(key="vw_next").click().run()
    assert at.slider(key="vw_threshold").value == pytest.approx(VOXEL_THRESHOLD)  # the calibrated default
    at.slider(key="vw_threshold").set_value(0.8).run()
    at.toggle(key="vw_keep_threshold").set_value(True).run()
    at.button(key="vw_prev").click().run()
    assert at.session_state["result_id"] == filled.ok_ids[0]
    assert at.slider(key="vw_threshold").value == pytest.approx(0.8)
    no_errors(at)


def test_next_previous_and_unreviewed_only(filled: FilledDB) -> None:
    store = open_store(filled.url)
    with store.session() as s:
        add_review(s, filled.ok_ids[1], "bob", "normal")
    store.close()
    at = app(page="viewer", run=filled.run_id)
    assert at.button(key="vw_prev").disabled
    at.button(key="vw_next").click().run()
    assert at.session_state["result_id"] == filled.ok_ids[1]
    at.button(key="vw_prev").click().run()
    assert at.session_state["result_id"] == filled.ok_ids[0]
    at.toggle(key="vw_unreviewed_only").set_value(True).run()
    at.button(key="vw_next").click().run()
    assert at.session_state["result_id"] == filled.ok_ids[2]  # the reviewed one is skipped
    no_errors(at)


def test_calibration_curves_from_verdicts_and_labels_and_saving(filled: FilledDB) -> None:
    at = app(page="calibration", run=filled.run_id)
    no_errors(at)
    assert at.slider(key="cal_scan_threshold").value == pytest.approx(SCAN_THRESHOLD)
    assert at.number_input(key="cal_voxel_threshold").value == pytest.approx(VOXEL_THRESHOLD)
    captions = " ".join(c.value for c in at.caption)
    assert "Dice vs threshold" in captions and "Pooled over 2 labelled scans" in captions
    assert "Needs reviewed scans of both kinds" in at.info[0].value

    store = open_store(filled.url)
    with store.session() as s:
        add_review(s, filled.ok_ids[0], "alice", "confirmed finding")
        add_review(s, filled.ok_ids[-1], "alice", "normal")
        add_review(s, filled.ok_ids[-2], "alice", "false positive")
    store.close()
    at.run()
    captions = " ".join(c.value for c in at.caption)
    assert "AUROC 1.000" in captions and "1 abnormal, 2 normal" in captions

    at.slider(key="cal_scan_threshold").set_value(0.25).run()
    at.number_input(key="cal_voxel_threshold").set_value(0.6).run()
    at.text_input(key="cal_name").input("reviewed")
    next(b for b in at.button if b.label == "Save calibration").click()
    at.run()
    no_errors(at)
    store = open_store(filled.url)
    with store.session() as s:
        saved = s.scalars(select(Calibration).where(Calibration.name == "reviewed")).one()
        assert (saved.method, saved.version, saved.voxel_threshold) == ("manual", 1, pytest.approx(0.6))
        assert saved.scan_threshold == pytest.approx(0.25)
        assert saved.metrics["verdicts"]["n_abnormal"] == 1 and saved.data["run_id"] == filled.run_id
    store.close()
    assert "reviewed@1" in at.success[0].value


def test_export_page_and_csv(filled: FilledDB) -> None:
    store = open_store(filled.url)
    with store.session() as s:
        add_review(s, filled.ok_ids[0], "alice", "artefact", "motion, ghosting")
        rows = reviews_table(s, filled.run_id)
    store.close()
    at = app(page="export", run=filled.run_id)
    no_errors(at)
    assert [m.value for m in at.metric] == ["1", "2", "5"]
    parsed = list(csv.DictReader(io.StringIO(to_csv(rows, REVIEW_COLUMNS))))
    assert parsed[0]["note"] == "motion, ghosting" and parsed[0]["verdict"] == "artefact"
    assert list(parsed[0]) == list(REVIEW_COLUMNS)
    at.radio(key="ex_scope").set_value("all runs").run()
    assert [m.value for m in at.metric] == ["1", "2", "6"]


def test_niivue_view_gets_the_scan_and_its_map(filled: FilledDB) -> None:
    at = app(page="viewer", run=filled.run_id)
    assert not at.get("component_instance")  # off by default: nothing is sent to the browser
    at.toggle(key="vw_3d").set_value(True).run()
    no_errors(at)
    (component,) = at.get("component_instance")
    args = json.loads(component.proto.json_args)
    assert [v["name"] for v in args["volumes"]] == ["input.nii.gz", "anomaly.nii.gz"]
    assert args["volumes"][1]["cal_min"] == pytest.approx(VOXEL_THRESHOLD)
    assert args["layout"] == "multiplanar" and len(args["crosshair_mm"]) == 3
    token = args["token"]
    at.slider(key="vw_threshold").set_value(0.7).run()
    args = json.loads(at.get("component_instance")[0].proto.json_args)
    assert args["token"] == token and args["volumes"][1]["cal_min"] == pytest.approx(
        0.7
    )  # no reload, new range

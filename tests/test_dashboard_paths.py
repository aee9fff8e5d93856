"""The dashboard opens only recorded files: outputs inside the run's folder, the recorded input and label."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from dashboard.paths import (
    UnsafePathError,
    check_output_path,
    check_recorded_path,
    display_path,
    inside,
    result_file,
)


@pytest.fixture
def layout(tmp_path: Path) -> SimpleNamespace:
    out = tmp_path / "run" / "out"
    out.mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    (out / "a_anomaly.nii.gz").write_bytes(b"x")
    (outside / "b_anomaly.nii.gz").write_bytes(b"x")
    return SimpleNamespace(out=out, outside=outside, root=tmp_path)


def test_output_inside_the_run_folder_is_allowed(layout: SimpleNamespace) -> None:
    path = check_output_path(str(layout.out / "a_anomaly.nii.gz"), str(layout.out))
    assert path == (layout.out / "a_anomaly.nii.gz").resolve()
    relative = check_output_path("a_anomaly.nii.gz", str(layout.out))  # relative paths are taken in out_dir
    assert relative == path


def test_dotdot_escape_is_refused(layout: SimpleNamespace) -> None:
    sneaky = str(layout.out / ".." / ".." / "secret" / "b_anomaly.nii.gz")
    with pytest.raises(UnsafePathError, match="outside the run's output folder"):
        check_output_path(sneaky, str(layout.out))
    with pytest.raises(UnsafePathError, match="outside"):
        check_output_path("../../secret/b_anomaly.nii.gz", str(layout.out))


def test_symlink_escape_is_refused(layout: SimpleNamespace) -> None:
    link = layout.out / "link_anomaly.nii.gz"
    os.symlink(layout.outside / "b_anomaly.nii.gz", link)
    with pytest.raises(UnsafePathError, match="outside"):
        check_output_path(str(link), str(layout.out))
    folder_link = layout.out / "sub"
    os.symlink(layout.outside, folder_link)
    with pytest.raises(UnsafePathError, match="outside"):
        check_output_path(str(folder_link / "b_anomaly.nii.gz"), str(layout.out))


def test_symlinked_output_folder_itself_is_fine(layout: SimpleNamespace) -> None:
    alias = layout.root / "alias"
    os.symlink(layout.out, alias)
    assert check_output_path(str(alias / "a_anomaly.nii.gz"), str(alias)).name == "a_anomaly.nii.gz"


def test_folder_itself_non_nifti_and_missing_out_dir_are_refused(layout: SimpleNamespace) -> None:
    assert not inside(layout.out, layout.out)
    with pytest.raises(UnsafePathError, match="not a .nii"):
        check_output_path(str(layout.out / "notes.txt"), str(layout.out))
    with pytest.raises(UnsafePathError, match="no output folder"):
        check_output_path(str(layout.out / "a_anomaly.nii.gz"), "")
    with pytest.raises(UnsafePathError, match="not a .nii"):
        check_output_path("/etc/passwd", str(layout.out))


def test_recorded_input_must_match_exactly() -> None:
    assert check_recorded_path("/data/scan.nii.gz", "/data/scan.nii.gz") == Path("/data/scan.nii.gz")
    with pytest.raises(UnsafePathError, match="not the input recorded"):
        check_recorded_path("/data/other.nii.gz", "/data/scan.nii.gz")
    with pytest.raises(UnsafePathError, match="not the input recorded"):
        check_recorded_path("/data/scan.nii.gz", None)
    with pytest.raises(UnsafePathError, match="NIfTI files only"):
        check_recorded_path("/etc/shadow", "/etc/shadow")


def test_result_file_applies_the_rule_per_kind(layout: SimpleNamespace) -> None:
    result = SimpleNamespace(
        map_path=str(layout.out / "a_anomaly.nii.gz"),
        recon_path=str(layout.outside / "b_anomaly.nii.gz"),
        mask_path=None,
        input_path="/data/in/a.nii.gz",
        details={"label_path": "/data/labels/a.nii.gz"},
    )
    assert result_file(result, str(layout.out), "anomaly") == (layout.out / "a_anomaly.nii.gz").resolve()
    with pytest.raises(UnsafePathError, match="recon file"):
        result_file(result, str(layout.out), "recon")
    assert result_file(result, str(layout.out), "mask") is None
    assert result_file(result, str(layout.out), "input") == Path("/data/in/a.nii.gz")
    assert result_file(result, str(layout.out), "label") == Path("/data/labels/a.nii.gz")
    with pytest.raises(ValueError, match="unknown file kind"):
        result_file(result, str(layout.out), "config")


def test_display_path_is_relative_inside_the_run_folder(layout: SimpleNamespace) -> None:
    assert display_path(str(layout.out / "a_anomaly.nii.gz"), str(layout.out)) == "a_anomaly.nii.gz"
    assert display_path("/elsewhere/x.nii.gz", str(layout.out)) == "/elsewhere/x.nii.gz"
    assert display_path(None, str(layout.out)) == ""

"""One strict builder for every configuration file (scoring settings, model families, a model folder's
``anomaly_model.json``) and lenient typed records for what the store keeps as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anomaly.config import ConfigError, ScoringSettings, load_scoring_settings
from anomaly.records import CalibrationData, ResultDetails
from pipelines.cli import main


def test_unknown_and_mistyped_settings_are_named_with_the_file(tmp_path: Path) -> None:
    config = tmp_path / "score.yaml"
    config.write_text("postprocess:\n  median_sise: 3\n")
    with pytest.raises(ConfigError, match=r"score\.yaml: unknown setting\(s\) postprocess\.median_sise; allowed: "
                                          r"postprocess\.median_size, postprocess\.erode_mm"):
        load_scoring_settings(config)
    config.write_text("postprocess:\n  erode_mm: two\n")
    with pytest.raises(ConfigError, match=r"score\.yaml: postprocess\.erode_mm must be a number, not 'two'"):
        load_scoring_settings(config)
    config.write_text("preprocess:\n  spacing: [1, 1]\n")
    with pytest.raises(ConfigError, match=r"preprocess\.spacing must be .*list of 3 values"):
        load_scoring_settings(config)
    config.write_text("score:\n  fraction: 1e-3\n  method: max\n")  # YAML 1.1 reads 1e-3 as text
    settings = load_scoring_settings(config)
    assert settings.score.fraction == 0.001 and settings.score.method == "max"
    config.write_text("preprocess:\n  spacing: [1, 1, 2]\n")
    assert load_scoring_settings(config).preprocess.spacing == (1.0, 1.0, 2.0)
    assert load_scoring_settings(None) == ScoringSettings(precision="auto")


def test_a_typo_in_a_model_folder_is_one_line_that_names_the_file(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "anomaly_model.json").write_text(json.dumps({"name": "m", "map": {"intensity_weigth": 1.0}}))
    scan = tmp_path / "x.nii.gz"
    scan.write_bytes(b"")
    code = main(["score", str(scan), "--out", str(tmp_path / "out"), "--model", str(folder), "--db",
                 str(tmp_path / "r.db"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "anomaly_model.json: unknown setting(s) map.intensity_weigth; allowed: map.reference" in err
    (folder / "anomaly_model.json").write_text("{not json")
    assert main(["score", str(scan), "--out", str(tmp_path / "out"), "--model", str(folder), "--db",
                 str(tmp_path / "r.db"), "--quiet"]) == 2
    assert "anomaly_model.json: not valid JSON" in capsys.readouterr().err


def test_a_typo_in_a_model_family_is_named(tmp_path: Path) -> None:
    from anomaly.models.families import load_families

    (tmp_path / "tiny.yaml").write_text("name: tiny\nautoencoder: {}\ninput_spec: {slice_size: 64, spacing: [1, 1, 1]}\n"
                                        "hub_repo: x\nforce_fp23: true\n")
    with pytest.raises(ConfigError, match=r"tiny\.yaml: unknown setting\(s\) force_fp23"):
        load_families(tmp_path)
    (tmp_path / "tiny.yaml").write_text("name: tiny\nautoencoder: {}\n")
    with pytest.raises(ConfigError, match=r"tiny\.yaml: missing setting\(s\) input_spec"):
        load_families(tmp_path)


def test_result_details_round_trip_and_read_old_rows() -> None:
    details = ResultDetails(warnings=["w"], timings={"model_s": 1.5}, contrast="t2", label_path="/l.nii.gz",
                            stages={"skull_strip": "deepbet", "brain_mask_ml": 1200.5})
    stored = details.to_dict()
    assert stored["skull_strip"] == "deepbet" and "stages" not in stored  # the JSON layout of earlier versions
    assert ResultDetails.from_dict(json.loads(json.dumps(stored))) == details
    old = {"warnings": ["a"], "contrast": None, "register": "mni-affine", "calibration": {"name": "c@1",
           "voxel_threshold": 0.5, "scan_threshold": None, "in_mni": True}, "timings": "odd"}
    read = ResultDetails.from_dict(old)
    assert read.warnings == ["a"] and read.stages == {"register": "mni-affine"} and read.timings == {}
    assert read.calibration is not None and read.calibration.in_mni and read.calibration.voxel_threshold == 0.5
    assert ResultDetails.from_dict(None) == ResultDetails() == ResultDetails.from_dict("not a dict")  # type: ignore[arg-type]


def test_calibration_data_defaults_for_rows_without_it() -> None:
    assert CalibrationData.from_dict({}).min_volume_ml == 0.05
    data = CalibrationData.from_dict({"min_volume_ml": 0.2, "scans": [{"path": "a", "content_hash": "h", "name": "a",
                                                                     "score": 1.0}], "future_key": 1})
    assert data.min_volume_ml == 0.2 and data.scans[0].name == "a"
    assert CalibrationData.from_dict(data.to_dict()) == data

"""Scan contrast: read from file names or set by the user, and validated where it is configured."""

from __future__ import annotations

from pathlib import Path

import pytest

from anomaly.config import ConfigError, PreprocessConfig, load_scoring_settings
from anomaly.contrast import guess_contrast, resolve_contrast


@pytest.mark.parametrize(("name", "expected"), [
    ("t1.nii.gz", "t1"), ("t1c.nii.gz", "t1"), ("Brats18_x_t1ce.nii.gz", "t1"), ("sub-01_T1w.nii.gz", "t1"),
    ("sub-01_acq-mprage_T1w.nii", "t1"), ("ch2bet.nii.gz", "t1"), ("t2.nii.gz", "t2"), ("sub-01_T2w.nii.gz", "t2"),
    ("flair.nii.gz", "flair"), ("sub-01_FLAIR.nii.gz", "flair"), ("T2_FLAIR.nii", "flair"),
    ("scan.nii.gz", None), ("patient_t12.nii.gz", None), ("not1.nii.gz", None),
])
def test_contrast_is_read_from_file_name_conventions(name: str, expected: str | None) -> None:
    assert guess_contrast(Path("/data/t2/scans") / name) == expected  # folders never decide


def test_a_set_contrast_wins_over_the_file_name() -> None:
    assert resolve_contrast("auto", "sub-01_T2w.nii.gz") == "t2"
    assert resolve_contrast("T1", "sub-01_T2w.nii.gz") == "t1"
    assert resolve_contrast("auto", None) is None


def test_bad_contrast_setting_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="preprocess.contrast must be one of auto, t1, t2, flair"):
        PreprocessConfig(contrast="dwi")
    config = tmp_path / "score.yaml"
    config.write_text("preprocess:\n  median: 3\n")
    with pytest.raises(ConfigError, match="preprocess.median"):
        load_scoring_settings(config, contrast="t1")
    config.write_text("preprocess:\n  lower_percentile: 1.0\n")
    settings = load_scoring_settings(config, contrast="FLAIR")
    assert settings.preprocess.contrast == "flair" and settings.preprocess.lower_percentile == 1.0
    assert settings.hash() != load_scoring_settings(config).hash()

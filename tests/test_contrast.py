"""Scan contrast: read from file names or set by the user, and validated where it is configured."""

from __future__ import annotations

from pathlib import Path

import pytest

from anomaly.config import ConfigError, PreprocessConfig, load_scoring_settings
from anomaly.contrast import contrast_from_text, guess_contrast, network_contrast, resolve_contrast
from anomaly.models.autoencoder import MapConfig
from anomaly.models.denoiser import DenoiserConfig


@pytest.mark.parametrize(("name", "expected"), [
    ("t1.nii.gz", "t1"), ("t1c.nii.gz", "t1c"), ("Brats18_x_t1ce.nii.gz", "t1c"), ("sub-01_T1w.nii.gz", "t1"),
    ("BraTS-GLI_t1gd.nii.gz", "t1c"), ("sub-01_ce-gadolinium_T1w.nii.gz", "t1c"), ("t1_gd.nii.gz", "t1c"),
    ("T1_post_contrast.nii", "t1c"), ("t1_postop.nii.gz", "t1"), ("sub-01_ce-gd_FLAIR.nii.gz", "flair"),
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
    with pytest.raises(ConfigError, match="preprocess.contrast must be one of auto, t1, t1c, t2, flair"):
        PreprocessConfig(contrast="dwi")
    config = tmp_path / "score.yaml"
    config.write_text("preprocess:\n  median: 3\n")
    with pytest.raises(ConfigError, match="preprocess.median"):
        load_scoring_settings(config, contrast="t1")
    config.write_text("preprocess:\n  lower_percentile: 1.0\n")
    settings = load_scoring_settings(config, contrast="FLAIR")
    assert settings.preprocess.contrast == "flair" and settings.preprocess.lower_percentile == 1.0
    assert settings.hash() != load_scoring_settings(config).hash()


@pytest.mark.parametrize(("text", "expected"), [
    ("T1 MPRAGE POST GD", "t1c"), ("AX T1 +C", "t1c"), ("T1+C SAG", "t1c"), ("t1_mprage_sag", "t1"),
    ("T1W_3D_TFE gado", "t1c"), ("T1 SE", "t1"), ("T2 TSE", "t2"), ("FLAIR post gd", "flair"),
])
def test_a_contrast_agent_named_beside_a_t1_makes_it_t1c(text: str, expected: str) -> None:
    assert contrast_from_text(text) == expected


def test_a_t1c_scan_takes_the_t1_network_and_its_own_map_rule_where_one_is_set() -> None:
    assert network_contrast("t1c") == "t1" and network_contrast("t2") == "t2" and network_contrast(None) is None
    classes = DenoiserConfig(classes=("t1", "t2", "flair"))
    assert classes.class_index("t1c") == classes.class_index("t1") == 0 and classes.class_index(None) == 3
    inherits = MapConfig(sign="abs", sign_by_contrast={"t1": "negative"}, intensity_weight_by_contrast={"t1": 0.5})
    assert inherits.sign_for("t1c") == "negative" and inherits.weight_for("t1c") == 0.5  # nothing of its own
    own = MapConfig(sign="positive", sign_by_contrast={"t1": "negative", "t1c": "abs"})
    assert (own.sign_for("t1"), own.sign_for("t1c"), own.sign_for(None)) == ("negative", "abs", "positive")
    with pytest.raises(ValueError, match="use t1, t1c, t2, flair or unknown"):
        MapConfig(sign_by_contrast={"t1gd": "abs"})


def test_a_bids_t1w_with_a_contrast_agent_entity_is_t1c() -> None:
    from anomaly.io.bids import BidsImage

    def image(**entities: str) -> BidsImage:
        return BidsImage(path=Path("x.nii.gz"), relpath="x.nii.gz", subject="01", session=None, suffix="T1w",
                         entities=entities)

    contrast, reason = image(ceagent="gadolinium").contrast
    assert contrast == "t1c" and "ce-gadolinium" in reason
    assert image().contrast[0] == "t1"

"""Command-line contract: every verb has help with an example; the shipped settings file is the default."""

from __future__ import annotations

import pytest

from anomaly.config import ScoringSettings, load_scoring_settings
from pipelines.cli import VERBS, build_parser, main
from tests.conftest import REPO


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help_with_an_example(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and f"anomaly {verb}" in out


def test_no_verb_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "score" in capsys.readouterr().out
    assert set(VERBS) >= {"score", "export", "models", "sample-data", "dashboard", "calibrate", "evaluate"}
    assert build_parser().prog == "anomaly"


def test_shipped_settings_file_holds_the_defaults() -> None:
    shipped = load_scoring_settings(REPO / "configs" / "score" / "default.yaml")
    assert shipped == ScoringSettings(precision="auto") == load_scoring_settings()


def test_precision_auto_is_bf16_only_where_the_hardware_has_it(tmp_path) -> None:  # noqa: ANN001
    from anomaly.config import (
        ConfigError,
        ScoringSettings,
        load_scoring_settings,
        native_bf16,
        resolve_precision,
    )

    expected = "bf16" if native_bf16("cpu") else "fp32"
    assert resolve_precision("auto") == expected and resolve_precision(None) == expected
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    assert load_scoring_settings().precision == expected  # the command line's default: auto (see the README)
    assert ScoringSettings().precision == "fp32"  # the library's stays fp32: results independent of the hardware
    assert load_scoring_settings(precision="auto").precision == expected
    assert ScoringSettings(precision="auto").precision == expected
    assert load_scoring_settings(precision="fp32").precision == "fp32"
    config = tmp_path / "s.yaml"
    config.write_text("precision: bf16\n")
    assert load_scoring_settings(config).precision == "bf16"
    with pytest.raises(ConfigError, match="precision"):
        ScoringSettings(precision="fp16")

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
    assert load_scoring_settings(REPO / "configs" / "score" / "default.yaml") == ScoringSettings()

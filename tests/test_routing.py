"""One model per contrast behind one folder: routes load, score on their own grid and filter, and are recorded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from anomaly.config import PostprocessConfig, PreprocessConfig, ScoringSettings
from anomaly.models import (
    ContrastRoutedModel,
    ModelLoadError,
    add_contrast_route,
    load_model,
    save_model_folder,
)
from anomaly.models.folder import weights_hash
from anomaly.preprocess import InputSpec
from anomaly.scoring import score_volume
from anomaly.volume import load_volume
from pipelines.work import ScanTask, score_scan
from tests.conftest import phantom, write_nifti

T2_SPEC = InputSpec(slice_size=32, spacing=(2.0, 2.0, 2.0))


@pytest.fixture()
def routed(tmp_path: Path, tiny_vae_folder: Path) -> Path:
    """The tiny VAE folder with a T2 route: the same VAE on a 2 mm, 32-pixel grid with a 3-pixel median."""
    base = shutil.copytree(tiny_vae_folder, tmp_path / "routed")
    vae = AutoencoderKL.from_pretrained(tiny_vae_folder / "vae")
    t2 = save_model_folder(tmp_path / "t2-model", vae, name="tiny-t2", input_spec=T2_SPEC, median_size=3)
    add_contrast_route(base, "t2", t2)
    return base


def test_a_route_loads_shares_the_vae_and_changes_the_identity(routed: Path, tiny_vae_folder: Path) -> None:
    meta = json.loads((routed / "t2" / "anomaly_model.json").read_text())
    assert meta["vae"] == "../vae" and not (routed / "t2" / "vae").exists()  # one copy of identical weights
    model = load_model(routed)
    assert isinstance(model, ContrastRoutedModel)
    t2 = model.for_contrast("t2")
    assert t2.name == "tiny-t2" and t2.input_spec == T2_SPEC and t2.median_size == 3
    assert model.for_contrast("t1") is model.base and model.for_contrast(None) is model.base
    assert model.for_contrast("t1c") is model.base
    identity = model.identity()
    assert identity.config["by_contrast"]["t2"]["name"] == "tiny-t2"
    assert identity.weights_hash == weights_hash(routed) != weights_hash(tiny_vae_folder)


def test_each_contrast_is_scored_on_its_route_grid_with_its_filter(routed: Path, tmp_path: Path) -> None:
    model = load_model(routed)
    data = phantom(lesion=True)
    t1 = load_volume(write_nifti(tmp_path / "case_t1.nii.gz", data))
    t2 = load_volume(write_nifti(tmp_path / "case_t2.nii.gz", data))
    assert score_volume(t1, model).prepared.image.shape[:2] == (64, 64)
    maps = score_volume(t2, model)
    assert maps.prepared.image.shape[:2] == (32, 32) and maps.prepared.spacing == (2.0, 2.0, 2.0)
    # no median in the settings: the route's own 3 pixels, the same as asking for 3, not the same as none
    same = score_volume(t2, model, ScoringSettings(postprocess=PostprocessConfig(median_size=3)))
    off = score_volume(t2, model, ScoringSettings(postprocess=PostprocessConfig(median_size=1)))
    np.testing.assert_array_equal(maps.anomaly, same.anomaly)
    assert not np.array_equal(maps.anomaly, off.anomaly)


def test_a_batch_records_which_route_scored_each_scan(routed: Path, tmp_path: Path) -> None:
    model = load_model(routed)
    paths = [write_nifti(tmp_path / "in" / name, phantom()) for name in ("a_t1.nii.gz", "b_t2.nii.gz")]
    outcomes = [score_scan(ScanTask(p, p.name.split(".")[0], str(i), tmp_path / "out"), model, ScoringSettings())
                for i, p in enumerate(paths)]
    assert [o.status for o in outcomes] == ["ok", "ok"], [o.error for o in outcomes]
    assert "model" not in outcomes[0].details.stages
    assert outcomes[1].details.stages["model"] == "t2: tiny-t2"
    # the map comes back on the input's own grid whichever route made it
    assert load_volume(Path(str(outcomes[1].map_path))).shape == load_volume(paths[1]).shape
    # a contrast forced by the settings picks the route too
    forced = score_scan(ScanTask(paths[0], "forced", "2", tmp_path / "out"), model,
                        ScoringSettings(preprocess=PreprocessConfig(contrast="t2")))
    assert forced.status == "ok" and forced.details.stages["model"] == "t2: tiny-t2"


def test_a_broken_route_is_refused_with_what_to_do(routed: Path) -> None:
    meta_path = routed / "anomaly_model.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "by_contrast": {"dwi": "t2"}}))
    with pytest.raises(ModelLoadError, match="by_contrast must map contrasts"):
        load_model(routed)
    meta_path.write_text(json.dumps({**meta, "by_contrast": {"t2": "missing"}}))
    with pytest.raises(ModelLoadError, match="reinstall the model, or remove t2"):
        load_model(routed)


def test_routes_move_to_the_device_with_the_model(routed: Path) -> None:
    model = load_model(routed, device="cpu")
    assert model.for_contrast("t2").device == torch.device("cpu") == model.device


def test_the_viewer_names_the_contrast_and_route_of_a_scan() -> None:
    from anomaly.records import ResultDetails
    from dashboard.views.viewer import _model_line

    routed = ResultDetails(contrast="t2", stages={"model": "t2: default-t2"})
    assert _model_line("default", routed) == "default (scored as T2; route t2: default-t2)"
    assert _model_line("default", ResultDetails()) == "default (contrast unknown)"
    assert _model_line("default", ResultDetails(contrast="t1c")) == "default (scored as T1c)"


def test_a_contrast_enhanced_t1_takes_the_t1_route(routed: Path, tiny_vae_folder: Path, tmp_path: Path) -> None:
    from anomaly.models.routing import route_note

    t1 = save_model_folder(tmp_path / "t1-model", AutoencoderKL.from_pretrained(tiny_vae_folder / "vae"),
                           name="tiny-t1", input_spec=T2_SPEC)
    add_contrast_route(routed, "t1", t1)
    model = load_model(routed)
    assert model.for_contrast("t1c") is model.for_contrast("t1") is not model.base  # type: ignore[attr-defined]
    assert route_note(model, "t1c") == "t1: tiny-t1" and route_note(model, "flair") is None


def test_the_command_line_adds_a_route(tmp_path: Path, tiny_vae_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.cli import main

    base = shutil.copytree(tiny_vae_folder, tmp_path / "mine")
    t2 = save_model_folder(tmp_path / "mine-t2", AutoencoderKL.from_pretrained(tiny_vae_folder / "vae"),
                           name="mine-t2", input_spec=T2_SPEC)
    assert main(["models", "route", str(base), "t2", str(t2)]) == 0
    assert "T2 scans scored with" in capsys.readouterr().out
    assert load_model(base).for_contrast("t2").name == "mine-t2"  # type: ignore[attr-defined]
    from pipelines.commands.models import _routes

    assert _routes(base) == {"t2": "mine-t2 (32 px at 2.0 mm)"}  # what `anomaly models list` prints under it
    assert main(["models", "route", str(base), "flair", str(base)]) == 2
    assert "not" in capsys.readouterr().err and not (base / "flair").exists()

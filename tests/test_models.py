"""Model registry and folders: real diffusers models saved and loaded in their own format."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from anomaly.models import (
    AutoencoderSliceModel,
    IntensityBaseline,
    ModelLoadError,
    available_models,
    load_model,
    load_model_folder,
    weights_hash,
)
from anomaly.preprocess import InputSpec


def _slices(n: int = 3, size: int = 64) -> torch.Tensor:
    x = torch.zeros(n, 1, size, size)
    x[:, :, 12:52, 10:54] = 0.6
    x[:, :, 30:36, 30:36] = 1.0
    return x


def test_folder_round_trip_gives_identical_maps(tiny_vae_folder: Path) -> None:
    model = load_model(tiny_vae_folder)
    assert isinstance(model, AutoencoderSliceModel)
    assert model.input_spec == InputSpec(slice_size=64, spacing=(1.0, 1.0, 1.0))
    vae = AutoencoderKL.from_pretrained(tiny_vae_folder / "vae")
    x = _slices()
    out = model.score_slices(x)
    with torch.no_grad():
        ref = ((vae.decode(vae.encode(x * 2 - 1).latent_dist.mode()).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(out.reconstruction, ref, atol=5e-4, rtol=0)  # channels-last kernels
    torch.testing.assert_close(out.anomaly, (x - ref).abs(), atol=5e-4, rtol=0)


def test_weights_hash_follows_the_weights(tiny_vae_folder: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_vae_folder, copy)
    assert weights_hash(copy) == weights_hash(tiny_vae_folder)
    vae = AutoencoderKL.from_pretrained(copy / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.1)
    vae.save_pretrained(copy / "vae")
    assert weights_hash(copy) != weights_hash(tiny_vae_folder)
    assert load_model(copy).identity().weights_hash == weights_hash(copy)


def test_plain_diffusers_folder_with_three_channels(tmp_path: Path) -> None:
    """A Stable-Diffusion-style RGB VAE folder: grey is repeated to RGB and averaged back."""
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4)
    vae.save_pretrained(tmp_path / "rgb")
    model = load_model_folder(tmp_path / "rgb", force_fp32=True)
    assert model.in_channels == 3 and model.precision == "fp32"
    out = model.score_slices(_slices(2))
    assert out.anomaly.shape == (2, 1, 64, 64) and out.reconstruction.shape == (2, 1, 64, 64)
    assert model.input_spec.slice_size % 8 == 0


def test_bf16_runs_and_stays_close(tiny_vae_folder: Path) -> None:
    fp32 = load_model(tiny_vae_folder).score_slices(_slices()).anomaly
    bf16 = load_model(tiny_vae_folder, precision="bf16").score_slices(_slices()).anomaly
    assert (bf16 - fp32).abs().mean() < 0.05


def test_restoration_stage_is_part_of_the_folder(tiny_healer_folder: Path) -> None:
    model = load_model(tiny_healer_folder)
    assert model.restoration is not None
    meta = json.loads((tiny_healer_folder / "anomaly_model.json").read_text())
    assert meta["restoration"] == "healer"
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = model.score_slices(_slices(), generator=g1)
    b = model.score_slices(_slices(), generator=g2)
    assert (a.anomaly >= 0).all()
    torch.testing.assert_close(a.anomaly, b.anomaly)
    assert model.identity().config["restoration"]["t0"] == 200


def test_intensity_baseline_map_is_the_input() -> None:
    x = _slices()
    assert torch.equal(IntensityBaseline().score_slices(x).anomaly, x)
    assert load_model("intensity").identity().weights_hash == "none"


def test_absent_weights_say_what_to_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANOMALY_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match="diffusion_pytorch_model.safetensors"):
        load_model("sdxl-vae")
    with pytest.raises(ModelLoadError, match="anomaly models import"):
        load_model("medical-vae")
    with pytest.raises(ModelLoadError, match="unknown model"):
        load_model("no-such-model")
    names = {row[0]: row[2] for row in available_models()}
    assert names["sd-vae-ft-mse"] is None and names["intensity"] == "built in"


def test_weights_of_another_architecture_are_refused_under_a_family_name(
        tiny_vae_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANOMALY_MODELS_DIR", str(tmp_path))
    shutil.copytree(tiny_vae_folder, tmp_path / "sd-vae-ft-mse")
    with pytest.raises(ModelLoadError, match=r"not a sd-vae-ft-mse model \(in_channels is 1, the family has 3.*"
                                             r"stabilityai/sd-vae-ft-mse.*load this folder by its path"):
        load_model("sd-vae-ft-mse")
    assert load_model(tmp_path / "sd-vae-ft-mse").name == "tiny-vae"  # by path it is just a folder


def test_a_family_config_serves_bare_diffusers_weights_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    families, models = tmp_path / "families", tmp_path / "models"
    families.mkdir()
    (families / "tiny-brain.yaml").write_text("""
name: tiny-brain
description: a two-level brain VAE
how_to_get: train it with anomaly train, then copy model/vae into {models_dir}/tiny-brain
input_spec: {slice_size: 48, spacing: [2.0, 2.0, 2.0]}
autoencoder:
  in_channels: 1
  out_channels: 1
  down_block_types: [DownEncoderBlock2D, DownEncoderBlock2D]
  up_block_types: [UpDecoderBlock2D, UpDecoderBlock2D]
  block_out_channels: [8, 16]
  layers_per_block: 1
  latent_channels: 4
  norm_num_groups: 4
  sample_size: 48
""")
    monkeypatch.setenv("ANOMALY_FAMILIES_DIR", str(families))
    monkeypatch.setenv("ANOMALY_MODELS_DIR", str(models))
    from anomaly.models.families import load_families

    family = load_families()["tiny-brain"]
    with pytest.raises(ModelLoadError, match=r"copy model/vae into .*models/tiny-brain"):
        load_model("tiny-brain")
    family.build().save_pretrained(models / "tiny-brain")  # a bare diffusers folder: no anomaly_model.json
    model = load_model("tiny-brain")
    assert isinstance(model, AutoencoderSliceModel) and model.name == "tiny-brain"
    assert model.input_spec == InputSpec(slice_size=48, spacing=(2.0, 2.0, 2.0))  # from the family
    assert "tiny-brain" in {row[0] for row in available_models()} and "default" in {row[0] for row in available_models()}


def test_project_families_are_valid_autoencoder_configurations() -> None:
    from anomaly.models.families import ARCHITECTURE_KEYS, load_families

    families = load_families()
    assert set(families) == {"default", "latent-healer", "medical-vae", "sd-vae-ft-mse", "sdxl-vae"}
    medical = families["medical-vae"].autoencoder
    assert (medical["in_channels"], medical["block_out_channels"], medical["layers_per_block"],
            medical["latent_channels"], medical["scaling_factor"]) == (1, [128, 256, 512, 512], 2, 4, 0.18215)
    assert families["sdxl-vae"].force_fp32 and families["sd-vae-ft-mse"].autoencoder["in_channels"] == 3
    for family in families.values():
        with torch.device("meta"):  # the full architecture, without allocating its weights
            vae = family.build()
        assert {k: family.autoencoder[k] for k in ARCHITECTURE_KEYS} == {
            k: list(v) if isinstance(v, tuple) else v for k, v in vae.config.items() if k in ARCHITECTURE_KEYS}
        assert family.input_spec.slice_size % 8 == 0
    shipped = json.loads((Path(__file__).resolve().parents[1] / "anomaly" / "assets" / "models" / "default" / "vae"
                          / "config.json").read_text())
    assert families["default"].mismatches(shipped) == [] and families["medical-vae"].mismatches(shipped)


def test_intensity_term_adds_the_unclamped_input(tiny_vae_folder: Path) -> None:
    from dataclasses import replace

    model = load_model(tiny_vae_folder)
    x = _slices() * 1.4
    plain = model.score_slices(x).anomaly
    model.map_config = replace(model.map_config, intensity_weight=1.5)
    torch.testing.assert_close(model.score_slices(x).anomaly, plain + 1.5 * x)
    with pytest.raises(ValueError, match="intensity_weight"):
        replace(model.map_config, intensity_weight=-1)


def test_intensity_floor_counts_only_brightness_above_the_contrasts_percentile(tiny_vae_folder: Path) -> None:
    import numpy as np

    from anomaly.config import PreprocessConfig
    from anomaly.models import MapConfig
    from anomaly.preprocess import prepare_volume
    from anomaly.volume import Volume
    from tests.conftest import phantom

    model = load_model(tiny_vae_folder)
    model.map_config = MapConfig(sign="abs", intensity_weight=1.5, intensity_floor={"t1": 99})
    data, affine = phantom(), np.eye(4)
    prepared = {c: prepare_volume(Volume(data, affine, Path(f"{c}.nii.gz")), PreprocessConfig(), model.input_spec)
                for c in ("t1", "t2", "scan")}
    assert [p.contrast for p in prepared.values()] == ["t1", "t2", None]
    floor = model.volume_context(prepared["t1"]).floor
    assert floor == pytest.approx(np.percentile(prepared["t1"].image[prepared["t1"].mask], 99)) and floor > 0.5
    assert model.volume_context(prepared["t1"]).contrast == "t1"
    assert model.volume_context(prepared["t2"]).floor == 0.0 and model.volume_context(prepared["scan"]).floor == 0.0
    x = _slices() * 1.4
    base = load_model(tiny_vae_folder)
    base.map_config = MapConfig(sign="abs")
    residual = base.score_slices(x).anomaly
    torch.testing.assert_close(model.score_slices(x, context=floor).anomaly,
                               residual + 1.5 * (x - floor).clamp_min(0))
    torch.testing.assert_close(model.score_slices(x, context=0.0).anomaly, residual + 1.5 * x)
    # moderate brightness (0.84 here) counts on T2 but not on T1, where it is ordinary white matter
    moderate = (x > 0.8) & (x < 0.9)
    assert (model.score_slices(x, context=0.9).anomaly - residual)[moderate].abs().max() == 0
    with pytest.raises(ValueError, match="unknown contrast"):
        MapConfig(intensity_floor={"dwi": 50})
    with pytest.raises(ValueError, match="percentile"):
        MapConfig(intensity_floor={"t1": 150})


def test_shipped_default_model_loads_with_its_restoration() -> None:
    from anomaly.models.denoiser import ImageDenoiser
    from anomaly.models.restoration import LatentDiffusionHealer
    from anomaly.models.routing import ContrastRoutedModel, model_for

    routed = load_model("default")
    assert isinstance(routed, ContrastRoutedModel) and set(routed.routes) == {"t2"}  # T2 scans: the 1 mm route
    t2 = model_for(routed, "t2")
    assert isinstance(t2, AutoencoderSliceModel) and isinstance(t2.restoration, ImageDenoiser)
    assert t2.input_spec.slice_size == 192 and t2.input_spec.spacing == (1.0, 1.0, 1.0) and t2.median_size == (1, 11, 19)
    assert t2.map_config.sign_for("t2") == "positive"
    model = model_for(routed, "t1")
    assert model is model_for(routed, None) is model_for(routed, "flair") is model_for(routed, "t1c") is routed.base
    assert isinstance(model, AutoencoderSliceModel) and isinstance(model.restoration, ImageDenoiser)
    assert model.restoration.config.classes == ("t1", "t2", "flair") and model.input_spec.slice_size == 128
    assert model.median_size == (1, 7, 13) and model.through_plane_mm == t2.through_plane_mm == 1.5  # the multi-scale median, the same millimetres as the T2 route's
    cfg = model.map_config
    assert cfg.normalise == "robust-signed" and cfg.reference == "input"
    assert (cfg.sign_for("t1"), cfg.sign_for("t2"), cfg.sign_for(None)) == ("negative", "positive", "abs")
    out = model.score_slices(_slices(2, 128), generator=torch.Generator().manual_seed(0))
    assert out.anomaly.shape == (2, 1, 128, 128) and (out.anomaly >= 0).all()
    previous = load_model("latent-healer")
    assert isinstance(previous, AutoencoderSliceModel) and isinstance(previous.restoration, LatentDiffusionHealer)


def test_missing_default_model_is_an_error_not_a_substitute(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from anomaly.models import registry

    monkeypatch.setattr(registry, "PACKAGED_MODELS", tmp_path / "none")
    monkeypatch.setenv("ANOMALY_MODELS_DIR", str(tmp_path))
    with pytest.raises(ModelLoadError, match="reinstall the package"):
        load_model("default")


@pytest.mark.slow
def test_a_built_wheel_serves_every_family_without_the_checkout(tmp_path: Path) -> None:
    """``configs/models`` sits outside the package; the wheel's build copies it in, so an installed wheel
    knows ``medical-vae`` and the SD baselines as a checkout does."""
    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(root / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("anomaly", "pipelines", "dashboard", "configs"):
        shutil.copytree(root / name, source / name, ignore=ignore)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
         str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")  # a pure-Python wheel installs by unpacking
    probe = (
        "import anomaly, json; from anomaly.models.families import families_dir; "
        "from anomaly.models.registry import entries; "
        "print(json.dumps([anomaly.__file__, str(families_dir()), sorted(entries())]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "ANOMALY_FAMILIES_DIR"}
    env["PYTHONPATH"] = str(tmp_path / "site")
    ran = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=120)  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    module, folder, names = json.loads(ran.stdout.strip().splitlines()[-1])
    assert Path(module).is_relative_to(tmp_path / "site")
    assert Path(folder) == tmp_path / "site" / "anomaly" / "assets" / "families"
    assert names == ["default", "latent-healer", "medical-vae", "sd-vae-ft-mse", "sdxl-vae"]
    assert sorted(p.name for p in Path(folder).glob("*.yaml")) == sorted(
        p.name for p in (root / "configs" / "models").glob("*.yaml")
    )

"""Tests for the image-space restoration stage: a tiny denoising UNet learns to remove coarse noise,
resumes from its checkpoint, travels in a model folder (diffusers format) and scores a volume."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from anomaly.models import load_model_folder, save_model_folder
from anomaly.models.autoencoder import MapConfig
from anomaly.models.denoiser import DenoiserConfig, ImageDenoiser, build_denoiser_unet
from anomaly.preprocess import InputSpec
from anomaly.scoring import score_volume
from anomaly.training.augment import AugmentConfig
from anomaly.training.config import ConfigError, DenoiserTrainConfig, VaeTrainConfig, load_recipe
from anomaly.training.data import build_slice_set, find_sources
from anomaly.training.denoiser import corrupt, start_from, train_denoiser, validation_mse
from anomaly.training.vae import build_vae
from anomaly.volume import load_volume
from tests.conftest import phantom, write_nifti

SPEC = InputSpec(slice_size=32, spacing=(2.0, 2.0, 2.0))
TINY = DenoiserTrainConfig(block_out_channels=(8, 16), layers_per_block=1, noise_std=(0.05, 0.15), noise_grid=8,
                           batch_size=16, crop_size=16, crop_until_step=20, full_batch_size=8, lr=3e-3,
                           max_steps=40, val_every=20)
NO_AUGMENT = AugmentConfig(affine_prob=0.0, elastic_prob=0.0, intensity_prob=0.0, bias_field_prob=0.0, noise_prob=0.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - fixture
    root = tmp_path_factory.mktemp("dae_data")
    for i in range(2):
        write_nifti(root / f"pat{i}" / "t2.nii.gz", phantom((40, 48, 40), seed=i), np.diag([2.0, 2.0, 2.0, 1.0]))
    slices = build_slice_set(find_sources(["pat*/t2.nii.gz"], base=root), SPEC, progress=False)
    return root, slices


def test_denoiser_learns_resumes_and_scores_from_its_folder(tmp_path: Path, data) -> None:  # noqa: ANN001
    torch.set_num_threads(2)
    root, slices = data
    first = train_denoiser(slices, slices, replace(TINY, max_steps=20), tmp_path / "run", slice_size=32,
                           augment=NO_AUGMENT, progress=False)
    assert first.step == 20 and first.model.config.classes == ("t2",)
    result = train_denoiser(slices, slices, TINY, tmp_path / "run", slice_size=32, augment=NO_AUGMENT, progress=False)
    assert result.step == 40 and [r["step"] for r in result.history] == [20.0, 40.0]  # resumed, not restarted
    model = result.model
    # it learned to denoise: its output is closer to the clean slices than the corrupted input was
    g = torch.Generator().manual_seed(5)
    clean, mask = slices.images.float(), slices.masks.float()
    noisy = corrupt(clean, mask, TINY, g)
    with torch.no_grad():
        out = model(noisy, torch.zeros(len(clean), dtype=torch.long))
    assert float(((out - clean) ** 2).mean()) < float(((noisy - clean) ** 2).mean())
    assert validation_mse(model, slices, TINY, None) < float(((noisy - clean) ** 2).mean())
    restored = model.restore(clean, "t2")
    assert restored.shape == clean.shape and float(restored[clean == 0].abs().max()) == 0.0

    vae = build_vae(VaeTrainConfig(block_out_channels=(8, 16)), 32).eval()
    folder = save_model_folder(tmp_path / "model", vae.half(), name="tiny-dae", input_spec=SPEC,
                               restoration=model.half(), map_config=MapConfig(reference="input", normalise="robust"))
    loaded = load_model_folder(folder)
    assert isinstance(loaded.restoration, ImageDenoiser) and loaded.restoration.config.classes == ("t2",)
    volume = load_volume(root / "pat1" / "t2.nii.gz")
    maps = score_volume(volume, loaded)
    assert maps.anomaly.shape == volume.shape and np.isfinite(maps.anomaly).all() and maps.anomaly.max() > 0
    # robust-signed: the signed difference is z-scored over the brain, so healthy tissue sits near zero
    # and one threshold in z units means the same in every scan
    loaded.map_config = replace(loaded.map_config, normalise="robust-signed", sign="positive")
    signed = score_volume(volume, loaded)
    brain = signed.brain_mask
    assert np.median(signed.anomaly[brain]) < 0.5 and 1.0 < np.percentile(signed.anomaly[brain], 99) < 50
    loaded.map_config = replace(loaded.map_config, normalise="robust", sign="abs")
    # with the input as reference, the image-space stage never runs the VAE: other VAE weights, same map
    with torch.no_grad():
        for p in loaded.vae.parameters():
            p.add_(torch.randn_like(p))
    np.testing.assert_array_equal(score_volume(volume, loaded).anomaly, maps.anomaly)
    # scoring ran the UNet frozen for the scan's contrast; in bf16 that network's weights are bf16
    assert list(loaded.restoration._fixed) == [0]
    in_bf16 = load_model_folder(folder, precision="bf16")
    bf16_maps = score_volume(volume, in_bf16)
    assert next(in_bf16.restoration._fixed[0].parameters()).dtype == torch.bfloat16
    assert np.corrcoef(bf16_maps.anomaly[brain], maps.anomaly[brain])[0, 1] > 0.95


def test_denoiser_recipe_is_typed_and_checks_its_noise(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nstage: denoiser\ndenoiser:\n  block_out_channels: [8, 16]\n  noise_std: [0.02, 0.1]\n")
    loaded = load_recipe(recipe)
    assert loaded.denoiser.block_out_channels == (8, 16) and tuple(loaded.denoiser.noise_std) == (0.02, 0.1)
    recipe.write_text("name: x\nstage: denoiser\ndenoiser:\n  noise_std: [0.2, 0.1]\n")
    with pytest.raises(ConfigError, match="noise_std"):
        load_recipe(recipe)
    shipped = load_recipe(Path(__file__).resolve().parents[1] / "configs" / "train" / "default.yaml")
    assert shipped.stage == "denoiser" and "ms-open/patient26" in shipped.data.exclude


def test_restore_keeps_a_dark_lesion_inside_the_brain_mask() -> None:
    """A lesion darker than the brain's lowest percentile is scaled to zero: with the brain mask it is
    restored (and can show in the map); judged by non-zero pixels alone it would count as background."""
    torch.manual_seed(0)
    unet = build_denoiser_unet((8, 16), 1, 32, 2)
    model = ImageDenoiser(unet.eval(), DenoiserConfig(classes=("t1",)))
    brain = torch.zeros(1, 1, 32, 32)
    brain[..., 4:28, 4:28] = 1
    x = brain * 0.6
    x[..., 12:18, 12:18] = 0.0  # the dark lesion, inside the brain
    with torch.no_grad():
        raw = model(x, torch.zeros(1, dtype=torch.long)).clamp(0, 1)
    masked = model.restore(x, "t1", mask=brain)
    assert torch.equal(masked[..., 12:18, 12:18], raw[..., 12:18, 12:18]) and float(masked[..., 12:18, 12:18].max()) > 0
    assert float(masked[brain == 0].abs().max()) == 0.0
    assert float(model.restore(x, "t1")[..., 12:18, 12:18].abs().max()) == 0.0


def test_denoiser_trains_on_from_a_saved_restoration_stage(tmp_path: Path, data) -> None:  # noqa: ANN001
    """``init_from`` starts from saved weights (the shipped ones can be trained further without their run's
    checkpoints) and refuses a folder of another layout or other contrast classes."""
    _, slices = data
    torch.manual_seed(3)
    saved = ImageDenoiser(build_denoiser_unet((8, 16), 1, 32, 2), DenoiserConfig(classes=("t2",)))
    saved.save_pretrained(tmp_path / "model" / "healer")
    fresh = build_denoiser_unet((8, 16), 1, 32, 2)
    start_from(fresh, ("t2",), tmp_path / "model")  # the model folder or its healer/ both serve
    for name, value in saved.unet.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    with pytest.raises(ConfigError, match="contrast classes"):
        start_from(build_denoiser_unet((8, 16), 1, 32, 3), ("t1", "t2"), tmp_path / "model")
    with pytest.raises(ConfigError, match="layout"):
        start_from(build_denoiser_unet((16, 32), 1, 32, 2), ("t2",), tmp_path / "model")
    with pytest.raises(ConfigError, match="no restoration stage"):
        start_from(fresh, ("t2",), tmp_path)
    lines: list[str] = []
    settings = replace(TINY, max_steps=1, lr=1e-12, init_from=str(tmp_path / "model"), crop_size=0)
    result = train_denoiser(slices, None, settings, tmp_path / "run", slice_size=32, augment=NO_AUGMENT,
                            progress=False, log=lines.append)
    assert any("initialised from" in line for line in lines)
    for name, value in saved.unet.state_dict().items():  # one step at a negligible rate: still the saved weights
        assert torch.allclose(result.model.unet.state_dict()[name], value, atol=1e-6), name

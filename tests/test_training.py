"""Tests for training: healthy-slice selection, exclusion of evaluation cases, a tiny VAE that learns,
checkpoint and resume, a tiny healer, and the saved model folder scoring a volume."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from anomaly.models import load_model_folder, save_model_folder
from anomaly.models.autoencoder import MapConfig
from anomaly.preprocess import InputSpec
from anomaly.scoring import score_volume
from anomaly.training.augment import AugmentConfig
from anomaly.training.config import EVALUATION_CASES, HealerTrainConfig, VaeTrainConfig, load_recipe
from anomaly.training.data import (
    ExcludedDataError,
    build_slice_set,
    check_not_excluded,
    find_sources,
    healthy_slices,
)
from anomaly.training.healer import train_healer
from anomaly.training.vae import build_vae, train_vae, validation_l1
from anomaly.volume import load_volume
from tests.conftest import phantom, write_nifti

SPEC = InputSpec(slice_size=32, spacing=(2.0, 2.0, 2.0))
AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])
TINY_VAE = VaeTrainConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, batch_size=8,
                          crop_size=16, crop_until_step=10, full_batch_size=4, lr=2e-3, max_steps=30,
                          val_every=10, bf16=False,
                          augment=AugmentConfig(elastic_prob=0.0))
TINY_HEALER = HealerTrainConfig(block_out_channels=(16, 32), attention=(False, True), layers_per_block=1,
                                augmented_copies=2, batch_size=16, lr=1e-3, max_steps=6, val_every=3,
                                bf16=False, t0=200, steps=2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three phantom patients with a lesion and its mask, plus one held-out evaluation case."""
    root = tmp_path_factory.mktemp("train_data")
    for i in range(3):
        vol = phantom((48, 56, 48), seed=i, lesion=True)
        lesion = vol > 150
        write_nifti(root / f"pat{i}" / "t2.nii.gz", vol, AFFINE)
        write_nifti(root / f"pat{i}" / "lesion_mask.nii.gz", lesion.astype(np.uint8), AFFINE, dtype=np.uint8)
    write_nifti(root / "brats2013" / "pat0001" / "flair.nii.gz", phantom((48, 56, 48), seed=9), AFFINE)
    return root


@pytest.fixture(scope="module")
def slices(data_dir: Path):  # noqa: ANN201 - fixture
    sources = find_sources(["pat*/t2.nii.gz"], ["lesion_mask.nii.gz"], base=data_dir)
    return build_slice_set(sources, SPEC, dilate_mm=2.0)


def test_slices_touching_a_lesion_are_left_out(data_dir: Path) -> None:
    sources = find_sources(["pat0/t2.nii.gz"], ["lesion_mask.nii.gz"], base=data_dir)
    assert sources[0].lesion_mask is not None
    healthy, masks = healthy_slices(sources[0], SPEC, dilate_mm=2.0)
    plain = replace(sources[0], lesion_mask=None)
    everything, _ = healthy_slices(plain, SPEC)
    assert 0 < len(healthy) < len(everything)
    assert healthy.shape[1:] == (1, 32, 32) and masks.dtype == torch.bool
    # no kept slice holds the lesion's intensity (lesion 180 scales to the top of [0, 1])
    assert float(healthy.float().amax()) < float(everything.float().amax())


def test_evaluation_cases_are_refused(data_dir: Path) -> None:
    excluded = ("brats2013/pat0001", "ms-open/patient26")
    with pytest.raises(ExcludedDataError, match="brats2013/pat0001"):
        find_sources(["brats2013/pat0001/flair.nii.gz"], exclude=excluded, base=data_dir)
    with pytest.raises(ExcludedDataError):
        check_not_excluded("/data/ms-open/patient26/t2.nii.gz", excluded)
    check_not_excluded("/data/ms-open/patient261/t2.nii.gz", excluded)  # a different case
    for colin in ("ch2.nii.gz", "ch2bet.nii.gz", "ch2better.nii.gz"):
        with pytest.raises(ExcludedDataError):
            check_not_excluded(f"/usr/share/mricron/templates/{colin}", EVALUATION_CASES)
    # a glob over a folder that holds an evaluation case skips it
    found = find_sources(["**/*.nii.gz"], exclude=excluded, base=data_dir)
    assert found and all("pat0001" not in str(s.path) for s in found)


def test_tiny_vae_learns_resumes_and_scores(tmp_path: Path, slices, data_dir: Path) -> None:  # noqa: ANN001
    torch.set_num_threads(2)
    before = validation_l1(build_vae(TINY_VAE, 32), slices, TINY_VAE)
    first = train_vae(slices, slices, replace(TINY_VAE, max_steps=20), tmp_path / "run", slice_size=32,
                      progress=False)
    assert first.step == 20 and (tmp_path / "run" / "vae_checkpoint.pt").is_file()
    assert first.history[-1]["val_l1"] < 0.7 * before
    resumed = train_vae(slices, slices, TINY_VAE, tmp_path / "run", slice_size=32, progress=False)
    assert resumed.step == 30 and len(resumed.history) == 3
    assert resumed.history[:2] == first.history

    folder = save_model_folder(tmp_path / "model", resumed.model, name="tiny", input_spec=SPEC)
    model = load_model_folder(folder)
    maps = score_volume(load_volume(data_dir / "pat1" / "t2.nii.gz"), model)
    assert maps.anomaly.shape == (48, 56, 48)
    assert np.isfinite(maps.anomaly).all() and maps.anomaly.max() > 0


def test_tiny_healer_trains_heals_and_travels_in_the_folder(tmp_path: Path, slices, data_dir: Path) -> None:  # noqa: ANN001
    torch.set_num_threads(2)
    vae = build_vae(TINY_VAE, 32).eval()
    result = train_healer(vae, slices, slices, TINY_HEALER, tmp_path / "run", augment=TINY_VAE.augment,
                          progress=False)
    healer = result.model
    assert result.step == 6 and "val_mse" in result.history[-1]
    assert healer.config.latent_scale > 0 and healer.config.t0 == 200
    z = vae.encode(slices.images[:4].float() * 2 - 1).latent_dist.mode()
    healed = healer.heal(z, generator=torch.Generator().manual_seed(0))
    assert healed.shape == z.shape and torch.isfinite(healed).all() and not torch.equal(healed, z)

    folder = save_model_folder(tmp_path / "model", vae, name="tiny-healer", input_spec=SPEC, restoration=healer,
                               map_config=MapConfig(reference="reconstruction", sign="positive"))
    model = load_model_folder(folder)
    assert model.restoration is not None and model.restoration.config.latent_scale == healer.config.latent_scale
    maps = score_volume(load_volume(data_dir / "pat2" / "t2.nii.gz"), model)
    assert maps.anomaly.shape == (48, 56, 48) and np.isfinite(maps.anomaly).all()


def test_recipe_yaml_is_typed_and_refuses_unknown_keys(tmp_path: Path) -> None:
    good = tmp_path / "r.yaml"
    good.write_text("name: x\nstage: vae\ndata:\n  volumes: [a.nii.gz]\n  spacing: [2, 2, 2]\n"
                    "vae:\n  block_out_channels: [8, 16]\n  augment:\n    noise_prob: 0.0\n")
    recipe = load_recipe(good)
    assert recipe.vae.block_out_channels == (8, 16) and recipe.vae.augment.noise_prob == 0.0
    assert "brats2018/Brats18_TCIA10_639_1" in recipe.data.all_excluded
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata:\n  volumes: [a]\nvae:\n  channels: [8]\n")
    with pytest.raises(ValueError, match="vae.channels"):
        load_recipe(bad)


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "train").glob("*.yaml")))
def test_shipped_recipes_keep_every_evaluation_case_out(name: str) -> None:
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "configs" / "train" / f"{name}.yaml")
    for case in ("ms-open/patient26", "brats2013/pat0001", "brats2013/pat0002",
                 "brats2018/Brats18_TCIA10_639_1", "mricron/templates/ch2"):
        assert case in recipe.data.exclude


def test_train_command_runs_a_tiny_recipe_into_a_loadable_folder(tmp_path: Path, data_dir: Path) -> None:
    import argparse
    import json

    from pipelines.commands import train as train_command

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"""
name: tiny
stage: both
save_fp16: true
map: {{sign: abs, intensity_weight: 1.5, intensity_floor: {{t1: 99}}, normalise: robust}}
data:
  base: "{data_dir}"
  volumes: ["pat*/t2.nii.gz", "brats2013/*/flair.nii.gz"]
  validation: [pat2]
  slice_size: 32
  spacing: [2.0, 2.0, 2.0]
  dilate_mm: 2.0
vae: {{block_out_channels: [8, 16], batch_size: 4, max_steps: 3, val_every: 3, bf16: false,
       augment: {{elastic_prob: 0.0}}}}
healer: {{block_out_channels: [16, 32], attention: [false, true], layers_per_block: 1, augmented_copies: 1,
          batch_size: 8, max_steps: 2, val_every: 2, bf16: false}}
""")
    parser = argparse.ArgumentParser()
    train_command.add_parser(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["train", "--config", str(recipe), "--out", str(tmp_path / "run"), "--quiet"])
    assert args.func(args) == 0
    folder = tmp_path / "run" / "model"
    model = load_model_folder(folder)
    assert model.restoration is not None and model.map_config.sign == "abs"
    assert model.map_config.intensity_weight == 1.5 and model.map_config.intensity_floor == {"t1": 99.0}
    assert model.map_config.normalise == "robust"
    volumes = json.loads((folder / "anomaly_model.json").read_text())["training_volumes"]
    assert volumes and not any(v.startswith(("pat0001", "pat2")) for v in volumes)


@pytest.mark.parametrize("name", ["default", "latent-healer"])
def test_shipped_models_are_small_and_trained_without_evaluation_cases(name: str) -> None:
    import json

    from anomaly.models.registry import PACKAGED_MODELS
    from anomaly.training.data import matches_exclusion

    folder = PACKAGED_MODELS / name
    if not (folder / "anomaly_model.json").is_file():
        pytest.skip("the default model folder is not present")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 20e6
    meta = json.loads((folder / "anomaly_model.json").read_text())
    held_out = {"patient26", "pat0001", "pat0002", "Brats18_TCIA10_639_1", "ch2bet.nii.gz", "ch2.nii.gz"}
    routes = [folder / sub for sub in (meta.get("by_contrast") or {}).values()]
    for part in [folder, *routes]:  # the model and every per-contrast route it scores with
        part_meta = json.loads((part / "anomaly_model.json").read_text())
        assert part_meta["restoration"] == "healer" and part_meta["training_volumes"]
        for case in part_meta["training_volumes"]:
            assert matches_exclusion(case, EVALUATION_CASES) is None and case.split("/")[0] not in held_out
    assert (folder / "MODEL_CARD.md").is_file()


def test_heads_are_stripped_with_the_brain_mask_beside_them(tmp_path: Path) -> None:
    brain = phantom((48, 56, 48), seed=3)
    inside = brain > 0
    head = np.where(inside, brain, 0).astype(np.float32)
    from scipy import ndimage

    shell = ndimage.binary_dilation(inside, iterations=4) & ~inside  # a bright "skull" around the brain
    head[shell] = 120.0
    write_nifti(tmp_path / "subj" / "t1_head.nii.gz", head, AFFINE)
    write_nifti(tmp_path / "subj" / "labels.nii.gz", (inside * 7).astype(np.uint8), AFFINE, dtype=np.uint8)
    sources = find_sources(["subj/t1_head.nii.gz"], base=tmp_path, brain_mask_names=["labels.nii.gz"])
    assert sources[0].brain_mask is not None and sources[0].contrast == "t1"
    stripped, masks = healthy_slices(sources[0], SPEC)
    raw, raw_masks = healthy_slices(replace(sources[0], brain_mask=None), SPEC)
    # stripped: only the labelled brain remains (zero outside the mask); raw: the skull fills the slices
    assert float(stripped.float()[~masks].abs().max()) == 0.0
    assert float(raw_masks.float().mean()) > 1.15 * float(masks.float().mean())
    assert build_slice_set(sources, SPEC, progress=False).contrasts == ["t1"] * len(stripped)


def test_class_conditional_healer_heals_towards_the_scans_contrast(tmp_path: Path, slices) -> None:  # noqa: ANN001
    torch.set_num_threads(2)
    vae = build_vae(TINY_VAE, 32).eval()
    mixed = type(slices)(torch.cat([slices.images, slices.images.flip(-1)]),
                         torch.cat([slices.masks, slices.masks.flip(-1)]),
                         slices.cases * 2, ["t2"] * len(slices) + ["flair"] * len(slices))
    config = replace(TINY_HEALER, class_conditional=True, balance_contrasts=True, max_steps=4)
    healer = train_healer(vae, mixed, mixed, config, tmp_path / "run", progress=False).model
    assert healer.config.classes == ("t2", "flair")
    assert healer.unet.config.num_class_embeds == 3  # t2, flair and "unknown"
    z = vae.encode(slices.images[:4].float() * 2 - 1).latent_dist.mode()
    by = {c: healer.heal(z, generator=torch.Generator().manual_seed(0), contrast=c) for c in ("t2", "flair", None)}
    assert not torch.equal(by["t2"], by["flair"]) and not torch.equal(by["t2"], by[None])
    folder = save_model_folder(tmp_path / "model", vae, name="cond", input_spec=SPEC, restoration=healer)
    again = load_model_folder(folder).restoration
    assert again is not None and again.config.classes == ("t2", "flair")
    torch.testing.assert_close(again.heal(z, generator=torch.Generator().manual_seed(0), contrast="flair"),
                               by["flair"], atol=2e-3, rtol=1e-2)

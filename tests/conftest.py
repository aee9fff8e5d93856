"""Shared fixtures: small brain-like phantoms written as real NIfTI files and tiny diffusers models."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def child_env() -> dict[str, str]:
    """This process's environment with the project on ``PYTHONPATH``, for tests that start Python children."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def phantom(shape: tuple[int, int, int] = (56, 64, 48), seed: int = 0, lesion: bool = False) -> np.ndarray:
    """A skull-stripped brain-like volume: ellipsoid 'brain' with a grey rim, white core and dark
    ventricles on a zero background; with ``lesion`` a bright blob in the white matter."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt((grid ** 2).sum(0) / 0.8 ** 2)
    vol = np.zeros(shape, np.float32)
    vol[r < 1.0] = 60
    vol[r < 0.8] = 100
    vent = np.sqrt((grid[0] / 0.15) ** 2 + (grid[1] / 0.3) ** 2 + (grid[2] / 0.2) ** 2) < 1
    vol[vent] = 30
    vol[r < 1.0] += rng.normal(0, 3, size=int((r < 1.0).sum())).astype(np.float32)
    if lesion:
        blob = np.sqrt(((grid[0] - 0.35) / 0.12) ** 2 + ((grid[1] + 0.2) / 0.12) ** 2 + (grid[2] / 0.12) ** 2) < 1
        vol[blob] = 180
    return vol


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None, dtype: type = np.float32,
                slope: float | None = None, inter: float = 0.0) -> Path:
    """Write a NIfTI file with a given on-disk dtype and optional scale slope."""
    affine = np.eye(4) if affine is None else affine
    img = nib.Nifti1Image(np.asarray(data), affine)
    img.set_data_dtype(dtype)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_vae_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 1-channel AutoencoderKL model folder (64-pixel slices at 1 mm) saved with save_pretrained."""
    import torch
    from diffusers import AutoencoderKL

    from anomaly.models import save_model_folder
    from anomaly.preprocess import InputSpec

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=64)
    folder = tmp_path_factory.mktemp("models") / "tiny-vae"
    save_model_folder(folder, vae, name="tiny-vae", input_spec=InputSpec(slice_size=64, spacing=(1.0, 1.0, 1.0)))
    return folder


@pytest.fixture(scope="session")
def tiny_healer_folder(tmp_path_factory: pytest.TempPathFactory, tiny_vae_folder: Path) -> Path:
    """The tiny VAE plus an untrained latent DDIM restoration stage, saved as one model folder."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel

    from anomaly.models import HealerConfig, LatentDiffusionHealer, MapConfig, save_model_folder
    from anomaly.preprocess import InputSpec

    torch.manual_seed(1)
    vae = AutoencoderKL.from_pretrained(tiny_vae_folder / "vae")
    unet = UNet2DModel(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                       layers_per_block=1, norm_num_groups=8,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    healer = LatentDiffusionHealer(unet, DDIMScheduler(num_train_timesteps=1000), HealerConfig(t0=200, steps=2))
    folder = tmp_path_factory.mktemp("models") / "tiny-healer"
    save_model_folder(folder, vae, name="tiny-healer", input_spec=InputSpec(slice_size=64, spacing=(1.0, 1.0, 1.0)),
                      restoration=healer, map_config=MapConfig(reference="reconstruction", sign="positive"))
    return folder

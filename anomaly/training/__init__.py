"""Training of slice VAEs and their latent restoration stages from folders of NIfTI volumes."""

from __future__ import annotations

from anomaly.training.config import DataConfig, HealerTrainConfig, TrainRecipe, VaeTrainConfig, load_recipe
from anomaly.training.data import ExcludedDataError, SliceSet, VolumeSource, build_slice_set, find_sources
from anomaly.training.healer import build_unet, train_healer
from anomaly.training.vae import build_vae, train_vae

__all__ = [
    "DataConfig", "ExcludedDataError", "HealerTrainConfig", "SliceSet", "TrainRecipe", "VaeTrainConfig",
    "VolumeSource", "build_slice_set", "build_unet", "build_vae", "find_sources", "load_recipe",
    "train_healer", "train_vae",
]

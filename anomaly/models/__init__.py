"""Reconstructors: diffusers ``AutoencoderKL`` families, restoration stages, the intensity baseline."""

from __future__ import annotations

from anomaly.models.autoencoder import AutoencoderSliceModel, MapConfig
from anomaly.models.base import ModelIdentity, SliceModel, SliceOutput
from anomaly.models.folder import ModelLoadError, load_model_folder, save_model_folder, weights_hash
from anomaly.models.intensity import IntensityBaseline
from anomaly.models.registry import available_models, load_model, models_dir
from anomaly.models.restoration import HealerConfig, LatentDiffusionHealer

__all__ = [
    "AutoencoderSliceModel", "HealerConfig", "IntensityBaseline", "LatentDiffusionHealer", "MapConfig",
    "ModelIdentity", "ModelLoadError", "SliceModel", "SliceOutput", "available_models", "load_model",
    "load_model_folder", "models_dir", "save_model_folder", "weights_hash",
]

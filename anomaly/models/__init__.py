"""Reconstructors: diffusers ``AutoencoderKL`` families, restoration stages, the intensity baseline."""

from __future__ import annotations

from anomaly.models.autoencoder import AutoencoderSliceModel, MapConfig
from anomaly.models.base import ModelIdentity, SliceModel, SliceOutput
from anomaly.models.folder import (
    ModelLoadError,
    add_contrast_route,
    load_model_folder,
    save_model_folder,
    weights_hash,
)
from anomaly.models.intensity import IntensityBaseline
from anomaly.models.registry import available_models, load_model, models_dir
from anomaly.models.restoration import HealerConfig, LatentDiffusionHealer
from anomaly.models.routing import ContrastRoutedModel, model_for

__all__ = [
    "AutoencoderSliceModel", "ContrastRoutedModel", "HealerConfig", "IntensityBaseline", "LatentDiffusionHealer", "MapConfig",
    "ModelIdentity", "ModelLoadError", "SliceModel", "SliceOutput", "add_contrast_route", "available_models", "load_model",
    "load_model_folder", "model_for", "models_dir", "save_model_folder", "weights_hash",
]

"""Reconstructors by name or by path: the shipped default, imported and cached VAEs, the baseline."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from anomaly.models.base import SliceModel
from anomaly.models.folder import ModelLoadError, is_model_folder, load_model_folder
from anomaly.models.intensity import IntensityBaseline

PACKAGED_MODELS = Path(__file__).resolve().parent.parent / "assets" / "models"


def models_dir() -> Path:
    """Where imported and downloaded model folders live: ``ANOMALY_MODELS_DIR`` or ``~/.cache/anomaly/models``."""
    return Path(os.environ.get("ANOMALY_MODELS_DIR") or Path.home() / ".cache" / "anomaly" / "models")


@dataclass(frozen=True)
class ModelEntry:
    """A named model: what it is, where its weights are looked for, and how to get them."""

    name: str
    description: str
    hub_repo: str | None = None
    force_fp32: bool = False
    how_to_get: str = ""

    def candidates(self) -> list[Path]:
        paths = [models_dir() / self.name]
        if (PACKAGED_MODELS / self.name).is_dir():
            paths.insert(0, PACKAGED_MODELS / self.name)
        if self.hub_repo:
            cached = _hf_cache_folder(self.hub_repo)
            if cached is not None:
                paths.append(cached)
        return paths

    def find(self) -> Path | None:
        return next((p for p in self.candidates() if is_model_folder(p)), None)


def _hf_cache_folder(repo_id: str) -> Path | None:
    """The snapshot folder of a repository already in the local Hugging Face cache (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - diffusers depends on huggingface_hub
        return None
    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found).parent if isinstance(found, str) else None


ENTRIES: dict[str, ModelEntry] = {
    "default": ModelEntry(
        "default", "the shipped CPU-sized brain VAE with its latent restoration stage (see its MODEL_CARD.md)",
        how_to_get="it ships inside the package under anomaly/assets/models/default; reinstall the package"),
    "medical-vae": ModelEntry(
        "medical-vae", "the public Medical-VAE (kl-f8, 1 channel, 256 px slices), imported from its LDM checkpoint",
        how_to_get="get VAE-Medical-klf8.pt from the Medical-VAE authors, then run "
                   "`anomaly models import VAE-Medical-klf8.pt --out {models_dir}/medical-vae`"),
    "sd-vae-ft-mse": ModelEntry(
        "sd-vae-ft-mse", "Stable-Diffusion VAE fine-tuned with MSE (3 channels, general images)",
        hub_repo="stabilityai/sd-vae-ft-mse",
        how_to_get="download config.json and diffusion_pytorch_model.safetensors from the Hugging Face repository "
                   "stabilityai/sd-vae-ft-mse into {models_dir}/sd-vae-ft-mse/ (or into the Hugging Face cache)"),
    "sdxl-vae": ModelEntry(
        "sdxl-vae", "SDXL VAE (3 channels; runs in fp32 because it overflows in fp16)",
        hub_repo="stabilityai/sdxl-vae", force_fp32=True,
        how_to_get="download config.json and diffusion_pytorch_model.safetensors from the Hugging Face repository "
                   "stabilityai/sdxl-vae into {models_dir}/sdxl-vae/ (or into the Hugging Face cache)"),
}

BUILTIN: dict[str, Callable[[], SliceModel]] = {"intensity": IntensityBaseline}


def available_models() -> list[tuple[str, str, str | None]]:
    """(name, description, folder or None when its weights are absent) for every known model."""
    rows: list[tuple[str, str, str | None]] = [("intensity", "non-learned baseline: normalised intensity", "built in")]
    for entry in ENTRIES.values():
        found = entry.find()
        rows.append((entry.name, entry.description, str(found) if found else None))
    return rows


def load_model(name_or_path: str | os.PathLike[str] = "default", *, precision: str = "fp32",
               device: str = "cpu", **restoration_overrides: object) -> SliceModel:
    """A model by registry name (``default``, ``intensity``, ``medical-vae``, ...) or by folder path."""
    key = str(name_or_path)
    if key in BUILTIN:
        return BUILTIN[key]()
    if key in ENTRIES:
        entry = ENTRIES[key]
        folder = entry.find()
        if folder is None:
            looked = ", ".join(str(p) for p in entry.candidates())
            raise ModelLoadError(f"model {key!r} has no weights on this machine (looked in {looked}); "
                                 + entry.how_to_get.format(models_dir=models_dir()))
        model = load_model_folder(folder, name=key, precision=precision, force_fp32=entry.force_fp32 or None,
                                  **restoration_overrides)
        return model.to(device)
    path = Path(key).expanduser()
    if path.exists():
        return load_model_folder(path, precision=precision, **restoration_overrides).to(device)
    raise ModelLoadError(f"unknown model {key!r}: give one of {', '.join([*BUILTIN, *ENTRIES])} "
                         "or the path of a model folder (config.json + safetensors)")

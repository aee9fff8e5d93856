"""Reconstructors by name or by path: the shipped default, imported and cached VAEs, the baseline."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomaly.models.base import SliceModel
from anomaly.models.families import ModelFamily, load_families
from anomaly.models.folder import ModelLoadError, is_model_folder, load_model_folder, vae_folder
from anomaly.models.intensity import IntensityBaseline

PACKAGED_MODELS = Path(__file__).resolve().parent.parent / "assets" / "models"


def models_dir() -> Path:
    """Where imported and downloaded model folders live: ``ANOMALY_MODELS_DIR`` or ``~/.cache/anomaly/models``."""
    return Path(os.environ.get("ANOMALY_MODELS_DIR") or Path.home() / ".cache" / "anomaly" / "models")


@dataclass(frozen=True)
class ModelEntry:
    """A named model: what it is, where its weights are looked for, how to get them, and its family."""

    name: str
    description: str
    hub_repo: str | None = None
    force_fp32: bool = False
    how_to_get: str = ""
    family: ModelFamily | None = None

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

    @classmethod
    def from_family(cls, family: ModelFamily) -> ModelEntry:
        return cls(family.name, family.description, hub_repo=family.hub_repo, force_fp32=family.force_fp32,
                   how_to_get=family.how_to_get, family=family)


def _hf_cache_folder(repo_id: str) -> Path | None:
    """The snapshot folder of a repository already in the local Hugging Face cache (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - diffusers depends on huggingface_hub
        return None
    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found).parent if isinstance(found, str) else None


_DEFAULT = ModelEntry(
    "default", "the shipped CPU-sized brain model, a denoising restoration stage beside a brain VAE (see its MODEL_CARD.md)",
    how_to_get="it ships inside the package under anomaly/assets/models/default; reinstall the package")


def entries() -> dict[str, ModelEntry]:
    """Named models: one per family in ``configs/models`` (see :mod:`anomaly.models.families`); the shipped
    default is served even where that folder is not installed."""
    found = {name: ModelEntry.from_family(family) for name, family in load_families().items()}
    return {"default": found.pop("default", _DEFAULT), **found}


BUILTIN: dict[str, Callable[[], SliceModel]] = {"intensity": IntensityBaseline}


def available_models() -> list[tuple[str, str, str | None]]:
    """(name, description, folder or None when its weights are absent) for every known model."""
    rows: list[tuple[str, str, str | None]] = [("intensity", "non-learned baseline: normalised intensity", "built in")]
    for entry in entries().values():
        found = entry.find()
        rows.append((entry.name, entry.description, str(found) if found else None))
    return rows


def load_model(name_or_path: str | os.PathLike[str] = "default", *, precision: str = "fp32",
               device: str = "cpu", **restoration_overrides: Any) -> SliceModel:
    """A model by registry name (``default``, ``intensity``, ``medical-vae``, ...) or by folder path."""
    key = str(name_or_path)
    if key in BUILTIN:
        return BUILTIN[key]()
    known = entries()
    if key in known:
        entry = known[key]
        folder = entry.find()
        if folder is None:
            looked = ", ".join(str(p) for p in entry.candidates())
            raise ModelLoadError(f"model {key!r} has no weights on this machine (looked in {looked}); "
                                 + entry.how_to_get.format(models_dir=models_dir()))
        config = vae_folder(folder) / "config.json"
        wrong = entry.family.mismatches(json.loads(config.read_text())) if entry.family and config.is_file() else []
        if wrong:  # checked on config.json, before any weights are read
            raise ModelLoadError(f"{folder}: these weights are not a {key} model ({'; '.join(wrong)}); put the "
                                 f"{key} files there ({entry.how_to_get.format(models_dir=models_dir())}), or "
                                 "load this folder by its path")
        model = load_model_folder(folder, name=key, precision=precision, force_fp32=entry.force_fp32 or None,
                                  input_spec=entry.family.input_spec if entry.family else None,
                                  **restoration_overrides)
        return model.to(device)
    path = Path(key).expanduser()
    if path.exists():
        return load_model_folder(path, precision=precision, **restoration_overrides).to(device)
    raise ModelLoadError(f"unknown model {key!r}: give one of {', '.join([*BUILTIN, *known])} "
                         "or the path of a model folder (config.json + safetensors)")

"""The model folder format: a diffusers ``AutoencoderKL`` folder, optionally inside a folder that adds
``anomaly_model.json`` (input spec, map rule, median filter), a restoration stage in its own subfolder and,
under ``by_contrast``, further model folders that scans of one contrast are scored with
(see :mod:`anomaly.models.routing`)."""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL

from anomaly.configparse import build, load_json
from anomaly.contrast import CONTRASTS
from anomaly.jsonio import write_json
from anomaly.median import median_setting
from anomaly.models.autoencoder import AutoencoderSliceModel, MapConfig
from anomaly.models.base import SliceModel
from anomaly.models.denoiser import ImageDenoiser
from anomaly.models.restoration import LatentDiffusionHealer, load_restoration
from anomaly.models.routing import ContrastRoutedModel
from anomaly.preprocess import InputSpec

MODEL_CONFIG = "anomaly_model.json"


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded; the message says which files are missing and where they go."""


def weights_hash(folder: str | os.PathLike[str]) -> str:
    """Hash of every weight and config file in a model folder: the model's identity in the store."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".bin")):
        digest.update(str(path.relative_to(folder)).encode())
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()[:16]


def is_model_folder(folder: str | os.PathLike[str]) -> bool:
    folder = Path(folder)
    return (folder / MODEL_CONFIG).is_file() or (folder / "config.json").is_file()


def default_input_spec(vae_config: dict[str, Any]) -> InputSpec:
    """1-channel brain VAEs use their trained slice size; RGB Stable-Diffusion VAEs get 192 px at 1 mm."""
    if int(vae_config.get("in_channels", 3)) == 1:
        size = int(vae_config.get("sample_size", 256))
        return InputSpec(slice_size=size if size >= 64 else 192, spacing=(1.0, 1.0, 1.0))
    return InputSpec(slice_size=192, spacing=(1.0, 1.0, 1.0))


def read_model_config(folder: Path) -> dict[str, Any] | None:
    """The folder's ``anomaly_model.json``, or None for a bare diffusers folder."""
    path = folder / MODEL_CONFIG
    return load_json(path, MODEL_CONFIG) if path.is_file() else None


def vae_folder(folder: str | os.PathLike[str]) -> Path:
    """Where a model folder keeps its ``AutoencoderKL`` (config.json + weights): the folder itself, or the
    subfolder its ``anomaly_model.json`` names."""
    folder = Path(folder)
    return _vae_dir(folder, read_model_config(folder))


def _vae_dir(folder: Path, meta: dict[str, Any] | None) -> Path:
    return folder if meta is None else folder / meta.get("vae", "vae")


def load_model_folder(folder: str | os.PathLike[str], *, name: str | None = None, precision: str = "fp32",
                      force_fp32: bool | None = None, input_spec: InputSpec | None = None,
                      **restoration_overrides: Any) -> AutoencoderSliceModel | ContrastRoutedModel:
    """Load a model folder (see module docstring) through diffusers' ``from_pretrained``; ``input_spec``
    applies where the folder does not state its own (a bare diffusers folder)."""
    model = _load_one(folder, name=name, precision=precision, force_fp32=force_fp32, input_spec=input_spec,
                      **restoration_overrides)
    routes = (read_model_config(Path(folder)) or {}).get("by_contrast") or {}
    if not routes:
        return model
    meta_path = Path(folder) / MODEL_CONFIG
    if not isinstance(routes, dict) or not set(routes) <= set(CONTRASTS):
        raise ModelLoadError(f"{meta_path}: by_contrast must map contrasts ({', '.join(CONTRASTS)}) to model "
                             f"subfolders, not {routes!r}; fix the file or reinstall the model")
    loaded: dict[str, SliceModel] = {}
    for contrast, sub in routes.items():
        where = Path(folder) / str(sub)
        if not (where / MODEL_CONFIG).is_file():
            raise ModelLoadError(f"{meta_path}: the {contrast} model folder {where} is missing or has no "
                                 f"{MODEL_CONFIG}; reinstall the model, or remove {contrast} from by_contrast")
        loaded[contrast] = _load_one(where, precision=precision, force_fp32=force_fp32, **restoration_overrides)
    return ContrastRoutedModel(model, loaded, weights_hash=model.weights_hash)


POSTPROCESS_KEYS = ("median_size", "through_plane_mm")


def _postprocess_settings(meta: dict[str, Any], meta_path: Path) -> tuple[int | tuple[int, ...] | None, float | None]:
    """The folder's ``postprocess`` section: the median size (one odd size or a list) and the sigma across
    slices (mm), checked before any weight is read."""
    section = meta.get("postprocess") or {}
    unknown = sorted(set(section) - set(POSTPROCESS_KEYS)) if isinstance(section, dict) else ["(not a mapping)"]
    if unknown:
        raise ModelLoadError(f"{meta_path}: unknown postprocess setting(s) {', '.join(unknown)}; allowed: "
                             f"{', '.join(POSTPROCESS_KEYS)}; fix the file or reinstall the model")
    median, sigma = section.get("median_size"), section.get("through_plane_mm")
    if median is not None:
        try:
            median = median_setting(median)
        except ValueError:
            raise ModelLoadError(f"{meta_path}: postprocess.median_size must be an odd number of pixels or a list "
                                 f"of them (1 = off), not {median!r}; fix the file or reinstall the model") from None
    if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 <= sigma <= 20):
        raise ModelLoadError(f"{meta_path}: postprocess.through_plane_mm must be a number of mm in [0, 20] "
                             f"(0 = off), not {sigma!r}; fix the file or reinstall the model")
    return median, None if sigma is None else float(sigma)


def _load_one(folder: str | os.PathLike[str], *, name: str | None = None, precision: str = "fp32",
              force_fp32: bool | None = None, input_spec: InputSpec | None = None,
              **restoration_overrides: Any) -> AutoencoderSliceModel:
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: model folder not found; give a model name (see `anomaly models list`) "
                             "or a folder holding config.json and safetensors weights")
    config = read_model_config(folder)
    vae_dir = _vae_dir(folder, config)
    meta = config or {}
    meta_path = folder / MODEL_CONFIG
    map_config = build(MapConfig, meta.get("map"), "map.", source=meta_path)
    median, through_plane = _postprocess_settings(meta, meta_path)
    if not (vae_dir / "config.json").is_file():
        raise ModelLoadError(f"{vae_dir}: no config.json; a model folder needs config.json and "
                             "diffusion_pytorch_model.safetensors as written by AutoencoderKL.save_pretrained")
    try:
        vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{vae_dir}: cannot load the AutoencoderKL weights: {exc}") from exc
    spec = build(InputSpec, meta["input_spec"], "input_spec.", source=meta_path) \
        if "input_spec" in meta else (input_spec or default_input_spec(dict(vae.config)))
    restoration = None
    if meta.get("restoration"):
        restoration = load_restoration(folder / meta["restoration"], **restoration_overrides)
    model = AutoencoderSliceModel(
        vae, name=name or meta.get("name") or folder.name, weights_hash=weights_hash(folder), input_spec=spec,
        restoration=restoration, map_config=map_config, precision=precision,
        force_fp32=bool(meta.get("force_fp32", False) if force_fp32 is None else force_fp32),
    )
    if median is not None:
        model.median_size = median
    if through_plane is not None:
        model.through_plane_mm = through_plane
    return model


def save_model_folder(folder: str | os.PathLike[str], vae: AutoencoderKL, *, name: str, input_spec: InputSpec,
                      restoration: LatentDiffusionHealer | ImageDenoiser | None = None,
                      map_config: MapConfig | None = None, force_fp32: bool = False, extra: dict[str, Any] | None = None,
                      median_size: int | tuple[int, ...] | None = None,
                      through_plane_mm: float | None = None) -> Path:
    """Write a model folder: ``vae/`` via ``save_pretrained``, ``healer/`` when present, and the meta file
    (``median_size``: the map's median filter in pixels of ``input_spec``'s grid, or several sizes whose
    medians are averaged, when not the default 5; ``through_plane_mm``: its smoothing across slices)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    meta: dict[str, Any] = {
        "format": 1, "name": name, "vae": "vae", "restoration": None,
        "input_spec": asdict(input_spec), "map": asdict(map_config or MapConfig()), "force_fp32": force_fp32,
        **(extra or {}),
    }
    post: dict[str, Any] = {}
    if median_size is not None:
        setting = median_setting(median_size)
        post["median_size"] = setting if isinstance(setting, int) else list(setting)
    if through_plane_mm is not None:
        post["through_plane_mm"] = float(through_plane_mm)
    if post:
        meta["postprocess"] = post
    if restoration is not None:
        restoration.save_pretrained(folder / "healer")
        meta["restoration"] = "healer"
    write_json(folder / MODEL_CONFIG, meta)
    return folder


def add_contrast_route(folder: str | os.PathLike[str], contrast: str, model: str | os.PathLike[str]) -> Path:
    """Copy the model folder ``model`` into ``folder/<contrast>`` and route scans of that contrast to it.
    A VAE identical to the folder's own is referred to (``"vae": "../vae"``) rather than copied twice."""
    folder, source = Path(folder), Path(model)
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast must be one of {', '.join(CONTRASTS)}, not {contrast!r}")
    meta, sub_meta = read_model_config(folder), read_model_config(source)
    if meta is None or sub_meta is None:
        raise ModelLoadError(f"{folder if meta is None else source}: no {MODEL_CONFIG}; both the model and its "
                             f"{contrast} route must be model folders (anomaly train writes them)")
    target = folder / contrast
    if target.exists():
        shutil.rmtree(target)
    own_vae, sub_vae = _vae_dir(folder, meta), _vae_dir(source, sub_meta)
    shared = _same_vae(own_vae, sub_vae)
    shutil.copytree(source, target)
    if shared:
        shutil.rmtree(target / sub_meta.get("vae", "vae"))
        sub_meta["vae"] = os.path.relpath(own_vae, target)
        write_json(target / MODEL_CONFIG, sub_meta)
    meta["by_contrast"] = {**(meta.get("by_contrast") or {}), contrast: contrast}
    write_json(folder / MODEL_CONFIG, meta)
    return target


def _same_vae(a: Path, b: Path) -> bool:
    """Whether two VAE folders hold the same architecture and the same weight bytes (diffusers' bookkeeping
    keys such as ``_name_or_path`` aside)."""
    def config(folder: Path) -> dict[str, Any]:
        return {k: v for k, v in load_json(folder / "config.json", "config.json").items() if not k.startswith("_")}

    def weights(folder: Path) -> list[bytes]:
        return [hashlib.sha256(p.read_bytes()).digest() for p in sorted(folder.glob("*.safetensors"))]

    return config(a) == config(b) and bool(weights(a)) and weights(a) == weights(b)

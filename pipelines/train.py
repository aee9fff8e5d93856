"""Run a training recipe: gather healthy slices, train the VAE and/or its healer, write a model folder."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

import torch
from diffusers import AutoencoderKL

from anomaly.models.folder import save_model_folder
from anomaly.preprocess import InputSpec
from anomaly.training.common import print_logger, set_threads
from anomaly.training.config import TrainRecipe
from anomaly.training.data import SliceSet, build_slice_set, find_sources, matches_exclusion
from anomaly.training.denoiser import train_denoiser
from anomaly.training.healer import train_healer
from anomaly.training.vae import train_vae

T = TypeVar("T", bound=torch.nn.Module)


def input_spec(recipe: TrainRecipe) -> InputSpec:
    return InputSpec(slice_size=recipe.data.slice_size, spacing=tuple(recipe.data.spacing))  # type: ignore[arg-type]


MEDIAN_SCALES_MM = (0.0, 10.5, 19.5)
"""Window widths (mm) of the map's multi-scale median filter, whose medians are averaged (0: the map itself):
1, 7 and 13 pixels at 1.5 mm, 1, 11 and 19 at 1 mm (chosen on the choice set, see the model card)."""


THROUGH_PLANE_MM = 1.5
"""Sigma (mm) of the map's Gaussian smoothing across slices: one slice of the 1.5 mm grid (model card)."""


def nearest_odd(pixels: float) -> int:
    """The odd whole number nearest to ``pixels`` (at least 1)."""
    return max(1, 2 * math.floor((pixels - 1) / 2 + 0.5) + 1)


def median_size(spec: InputSpec) -> tuple[int, ...]:
    """The multi-scale median's window sizes in pixels of ``spec``'s grid: :data:`MEDIAN_SCALES_MM`."""
    return tuple(dict.fromkeys(nearest_odd(mm / float(spec.spacing[0])) for mm in MEDIAN_SCALES_MM))


def gather_slices(recipe: TrainRecipe, work: Path, progress: bool = True) -> tuple[SliceSet, SliceSet | None]:
    """Train and validation slices of the recipe, cached in ``work/slices.pt`` (rebuilt when the data list changes)."""
    data = recipe.data
    fields = asdict(data)
    if data.skull_strip == "skip":  # the default leaves slice caches made before the setting existed valid
        fields.pop("skull_strip")
    key = json.dumps(fields, sort_keys=True, default=list)
    cache = work / "slices.pt"
    if cache.is_file() and (work / "slices.key").is_file() and (work / "slices.key").read_text() == key:
        both = torch.load(cache, weights_only=True)
        train = SliceSet.from_dict(both["train"])
        val = SliceSet.from_dict(both["val"]) if both["val"] else None
        return train, val
    sources = find_sources(data.volumes, data.lesion_masks, data.all_excluded, base=data.base,
                           brain_mask_names=data.brain_masks)
    train_src = [s for s in sources if matches_exclusion(s.path, data.validation) is None]
    val_src = [s for s in sources if matches_exclusion(s.path, data.validation) is not None]
    spec = input_spec(recipe)
    train = build_slice_set(train_src, spec, dilate_mm=data.dilate_mm, exclude=data.all_excluded, progress=progress,
                            skull_strip=data.skull_strip)
    val = build_slice_set(val_src, spec, dilate_mm=data.dilate_mm, exclude=data.all_excluded,
                          skull_strip=data.skull_strip) if val_src else None
    work.mkdir(parents=True, exist_ok=True)
    torch.save({"train": train.to_dict(), "val": val.to_dict() if val else None}, cache)
    (work / "slices.key").write_text(key)
    return train, val


def run_recipe(recipe: TrainRecipe, *, out: str | None = None, resume: bool = True, progress: bool = True) -> Path:
    """Train the recipe's stage(s); the model folder is ``OUT/model`` (checkpoints and log beside it)."""
    work = Path(out or recipe.out)
    work.mkdir(parents=True, exist_ok=True)
    log = print_logger(work / "train.log")
    set_threads(recipe.threads)
    train, val = gather_slices(recipe, work, progress)
    log(f"recipe {recipe.name}: {len(train)} training slices from {len(set(train.cases))} volumes, "
        f"{len(val) if val else 0} validation slices")
    spec = input_spec(recipe)
    folder = work / "model"
    map_config = recipe.map
    extra = {"recipe": asdict(recipe), "training_volumes": sorted(set(train.cases))}
    if recipe.stage in ("vae", "both"):
        result = train_vae(train, val, recipe.vae, work, slice_size=spec.slice_size, seed=recipe.seed,
                           resume=resume, progress=progress, log=log)
        extra["vae_training"] = {"steps": result.step, "best_val_l1": result.best_val, "stopped": result.stopped}
        save_model_folder(folder, _for_saving(result.model, recipe.save_fp16), name=recipe.name, input_spec=spec,
                          map_config=map_config, extra=_json_safe(extra), median_size=median_size(spec),
                          through_plane_mm=THROUGH_PLANE_MM)
        vae = result.model
    else:
        vae_dir = Path(recipe.vae_from) if recipe.vae_from else folder / "vae"
        if not (vae_dir / "config.json").is_file():
            raise FileNotFoundError(f"{vae_dir}: no trained VAE for the healer stage; run the recipe with "
                                    "stage: vae (or both) first, with the same out folder, or set vae_from")
        vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True)
    if recipe.stage != "vae":  # the restoration stage, in image space (denoiser) or in the latent (healer)
        prior = _previous_extra(folder)
        if recipe.stage == "denoiser":
            result = train_denoiser(train, val, recipe.denoiser, work, slice_size=spec.slice_size,
                                    augment=recipe.vae.augment, seed=recipe.seed, resume=resume, progress=progress,
                                    log=log)
        else:
            result = train_healer(vae, train, val, recipe.healer, work, augment=recipe.vae.augment, seed=recipe.seed,
                                  resume=resume, progress=progress, log=log)
        trained = {"steps": result.step, "best_val_mse": result.best_val, "stopped": result.stopped}
        extra = {**prior, **extra, f"{'denoiser' if recipe.stage == 'denoiser' else 'healer'}_training": trained}
        save_model_folder(folder, _for_saving(vae, recipe.save_fp16), name=recipe.name, input_spec=spec,
                          restoration=_for_saving(result.model, recipe.save_fp16), map_config=map_config,
                          extra=_json_safe(extra), median_size=median_size(spec),
                          through_plane_mm=THROUGH_PLANE_MM)
    log(f"model folder written: {folder}")
    return folder


def _for_saving(module: T, fp16: bool) -> T:
    """A float16 copy of a module for writing (weights load back as float32), or the module itself."""
    return copy.deepcopy(module).half() if fp16 else module


def _previous_extra(folder: Path) -> dict:
    meta = folder / "anomaly_model.json"
    if not meta.is_file():
        return {}
    data = json.loads(meta.read_text())
    return {k: v for k, v in data.items() if k in ("vae_training",)}


def _json_safe(value: object) -> dict:
    return json.loads(json.dumps(value, default=list))

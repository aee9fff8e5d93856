"""Typed training recipes parsed from YAML: data, VAE stage, healer stage, output."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomaly.configparse import ConfigError, build, load_yaml
from anomaly.models.autoencoder import MapConfig
from anomaly.training.augment import AugmentConfig
from anomaly.training.blobs import RADIUS_SAMPLINGS

#: The project's held-out evaluation cases: refused by every recipe, whatever its own list says.
EVALUATION_CASES: tuple[str, ...] = (
    "mricron/templates/ch2", "mricron/templates/ch2bet", "mricron/templates/ch2better", "colin27", "ms-open/patient26", "brats2013/pat0001", "brats2013/pat0002",
    "brats2018/Brats18_TCIA10_639_1",
)


@dataclass(frozen=True)
class DataConfig:
    """Which volumes to train on (glob patterns, relative to the recipe's ``base``), which lesion mask
    names to look for beside them, which brain (or intracranial label) masks strip the heads among them,
    what to keep out, and which cases form the validation split. ``skull_strip`` (``skip``, ``auto``,
    ``force``) runs the scoring pipeline's brain-extraction stage on volumes without such a mask, so
    healthy heads with skull can join the training slices exactly as scoring would see them."""

    volumes: tuple[str, ...] = ()
    lesion_masks: tuple[str, ...] = ("lesion_mask.nii.gz", "tumor_labels.nii.gz")
    brain_masks: tuple[str, ...] = ()
    exclude: tuple[str, ...] = EVALUATION_CASES
    validation: tuple[str, ...] = ()
    dilate_mm: float = 5.0
    base: str = "."
    slice_size: int = 128
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    skull_strip: str = "skip"

    def __post_init__(self) -> None:
        if self.skull_strip not in ("skip", "auto", "force"):
            raise ConfigError(f"data.skull_strip must be skip, auto or force, not {self.skull_strip!r}")

    @property
    def all_excluded(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*EVALUATION_CASES, *self.exclude)))


@dataclass(frozen=True)
class VaeTrainConfig:
    """The slice ``AutoencoderKL`` and its optimisation: L1 (+ SSIM), small KL, optional denoising;
    ``crop_size`` > 0 trains on random square crops of the slices (the network is convolutional, so it
    still runs on whole slices; a quarter of the pixels makes a step about four times cheaper) up to step
    ``crop_until_step`` (0 = throughout), then whole slices in batches of ``full_batch_size``, because
    GroupNorm statistics of crops differ from those of whole slices. ``init_from`` starts from the
    weights of an ``AutoencoderKL`` folder of the same layout (fine-tuning, e.g. into the denoising variant)."""

    block_out_channels: tuple[int, ...] = (32, 64, 128, 128)
    layers_per_block: int = 1
    latent_channels: int = 4
    batch_size: int = 16
    crop_size: int = 0
    crop_until_step: int = 0
    full_batch_size: int = 0
    lr: float = 2e-4
    max_steps: int = 2000
    max_minutes: float = 0.0
    kl_weight: float = 1e-6
    ssim_weight: float = 0.0
    denoise_std: float = 0.0
    denoise_grid: int = 16
    val_every: int = 100
    patience: int = 0
    bf16: bool = True
    init_from: str = ""
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class HealerTrainConfig:
    """The latent ``UNet2DModel`` (epsilon prediction, DDPM steps) and how healing runs at scoring.

    ``class_conditional`` gives the UNet one class per contrast (t1, t2, flair) plus an "unknown" class,
    trained on a random ``uncond_prob`` share of the latents, so a healer restores towards the normal
    anatomy *of the scan's own contrast*; ``balance_contrasts`` samples each contrast equally often."""

    block_out_channels: tuple[int, ...] = (64, 128, 128)
    attention: tuple[bool, ...] = (False, True, True)
    layers_per_block: int = 2
    num_train_timesteps: int = 1000
    augmented_copies: int = 4
    batch_size: int = 64
    lr: float = 2e-4
    max_steps: int = 3000
    max_minutes: float = 0.0
    ema_decay: float = 0.999
    val_every: int = 200
    patience: int = 0
    bf16: bool = True
    t0: int = 250
    t0_by_contrast: dict[str, int] = field(default_factory=dict)
    steps: int = 5
    draws: int = 1
    class_conditional: bool = False
    uncond_prob: float = 0.15
    balance_contrasts: bool = False


@dataclass(frozen=True)
class DenoiserTrainConfig:
    """The image-space restoration stage (:class:`anomaly.models.denoiser.ImageDenoiser`): a UNet learns
    to return healthy slices from copies corrupted by coarse Gaussian noise (std drawn per slice between
    ``noise_std`` bounds on a ``noise_grid`` x ``noise_grid`` grid, upsampled, inside the brain), after
    the recipe's augmentation; MSE loss, EMA weights. Class conditioning as for the healer. ``crop_size``
    and ``crop_until_step`` train on random crops first (cheaper), as for the VAE, then on whole slices
    in batches of ``full_batch_size``. ``blob_probability`` > 0 also paints synthetic lesion blobs
    (:mod:`anomaly.training.blobs`: ``blob_count`` per slice, ``blob_radius_px`` in model pixels) into that
    share of the slices before the noise, so the network learns to replace whole regions, not only noise,
    from step ``blob_from_step`` on (validation always includes them when they are on); ``blob_foreign_share``
of the blobs carry normal tissue from elsewhere instead of a level (anatomy out of place); ``blob_radius_sampling``
``log`` draws radii log-uniformly (small blobs as often per octave as large ones) instead of uniformly. ``init_from`` starts
from the restoration stage of a model folder of the same layout (its ``healer/``, or that folder itself):
training on from shipped weights, since the checkpoints of the run that made them are not kept."""

    block_out_channels: tuple[int, ...] = (16, 32, 64, 128)
    layers_per_block: int = 1
    noise_std: tuple[float, float] = (0.05, 0.2)
    noise_grid: int = 16
    batch_size: int = 16
    crop_size: int = 0
    crop_until_step: int = 0
    full_batch_size: int = 0
    lr: float = 2e-4
    max_steps: int = 4000
    max_minutes: float = 0.0
    ema_decay: float = 0.999
    val_every: int = 200
    patience: int = 0
    class_conditional: bool = True
    uncond_prob: float = 0.15
    balance_contrasts: bool = True
    blob_probability: float = 0.0
    blob_count: tuple[int, int] = (1, 3)
    blob_radius_px: tuple[float, float] = (3.0, 20.0)
    blob_from_step: int = 0
    blob_foreign_share: float = 0.0
    blob_radius_sampling: str = "uniform"
    init_from: str = ""

    def __post_init__(self) -> None:
        low, high = (float(v) for v in self.noise_std)
        if not 0 <= low <= high:
            raise ConfigError(f"denoiser.noise_std must be [low, high] with 0 <= low <= high, not {list(self.noise_std)}")
        if not 0 <= self.blob_probability <= 1:
            raise ConfigError(f"denoiser.blob_probability must lie in [0, 1], not {self.blob_probability}")
        if not 1 <= int(self.blob_count[0]) <= int(self.blob_count[1]):
            raise ConfigError(f"denoiser.blob_count must be [low, high] with 1 <= low <= high, not {list(self.blob_count)}")
        if not 0 <= self.blob_foreign_share <= 1:
            raise ConfigError(f"denoiser.blob_foreign_share must lie in [0, 1], not {self.blob_foreign_share}")
        if self.blob_radius_sampling not in RADIUS_SAMPLINGS:
            raise ConfigError(f"denoiser.blob_radius_sampling must be one of {', '.join(RADIUS_SAMPLINGS)}, "
                              f"not {self.blob_radius_sampling!r}")
        if self.blob_from_step < 0:
            raise ConfigError(f"denoiser.blob_from_step must be 0 or more, not {self.blob_from_step}")
        if not 0 < float(self.blob_radius_px[0]) <= float(self.blob_radius_px[1]):
            raise ConfigError("denoiser.blob_radius_px must be [low, high] pixels with 0 < low <= high, "
                              f"not {list(self.blob_radius_px)}")


@dataclass(frozen=True)
class TrainRecipe:
    """A whole training recipe: ``stage`` is ``vae``, ``healer``, ``both`` (VAE then healer) or ``denoiser``
    (the image-space restoration stage, kept with the VAE that ``vae_from`` names); ``save_fp16`` halves the
    weight files (they load back as float32); ``map`` is the map rule written into the model folder
    (:class:`anomaly.models.autoencoder.MapConfig`); ``vae_from`` (with stage ``healer``) names the
    ``AutoencoderKL`` folder the healer is trained on, instead of the one the vae stage wrote."""

    name: str = "model"
    stage: str = "both"
    out: str = "runs/model"
    seed: int = 0
    threads: int = 0
    map: MapConfig = field(default_factory=MapConfig)
    save_fp16: bool = True
    vae_from: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    vae: VaeTrainConfig = field(default_factory=VaeTrainConfig)
    healer: HealerTrainConfig = field(default_factory=HealerTrainConfig)
    denoiser: DenoiserTrainConfig = field(default_factory=DenoiserTrainConfig)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(f"stage must be one of {', '.join(STAGES)}, not {self.stage!r}")


STAGES = ("vae", "healer", "both", "denoiser")


def load_recipe(path: str | os.PathLike[str], **overrides: Any) -> TrainRecipe:
    """A recipe from YAML; a relative ``data.base`` is taken relative to the current directory."""
    data = load_yaml(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    recipe = build(TrainRecipe, data, source=path)
    if not recipe.data.volumes and recipe.stage not in ("healer", "denoiser"):
        raise ConfigError(f"{Path(path)}: data.volumes is empty; list the training volumes (glob patterns)")
    return recipe

"""Training of the image-space restoration stage: a denoising ``UNet2DModel`` learns to return healthy
slices from copies corrupted with coarse noise, so at scoring it pulls lesions back to normal tissue."""

from __future__ import annotations

import copy
import os
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel

from anomaly.configparse import ConfigError
from anomaly.contrast import CONTRASTS
from anomaly.models.denoiser import DenoiserConfig, ImageDenoiser, build_denoiser_unet
from anomaly.training.augment import AugmentConfig, augment_batch, build_augmentation
from anomaly.training.blobs import BlobSettings, paint_blobs
from anomaly.training.common import Logger, TrainResult, seed_everything
from anomaly.training.config import DenoiserTrainConfig
from anomaly.training.data import SliceSet
from anomaly.training.healer import contrast_labels, sampling_weights
from anomaly.training.loop import LoopSettings, TrainingLoop, ema_weights, optimise
from anomaly.training.vae import coarse_noise, random_crops

CHECKPOINT = "denoiser_checkpoint.pt"


def corrupt(x: torch.Tensor, mask: torch.Tensor, config: DenoiserTrainConfig,
            generator: torch.Generator) -> torch.Tensor:
    """Slices plus coarse Gaussian noise inside the brain, one noise level per slice between the bounds;
    with ``blob_probability`` > 0, synthetic lesion blobs are painted into some slices first."""
    if config.blob_probability > 0:
        settings = BlobSettings(config.blob_probability, tuple(int(c) for c in config.blob_count),  # type: ignore[arg-type]
                                tuple(float(r) for r in config.blob_radius_px),  # type: ignore[arg-type]
                                config.blob_foreign_share, config.blob_radius_sampling)
        x = paint_blobs(x, mask, settings, generator)
    low, high = (float(v) for v in config.noise_std)
    std = low + (high - low) * torch.rand((x.shape[0], 1, 1, 1), generator=generator)
    noise = coarse_noise(x, 1.0, config.noise_grid, generator) * std
    return x + noise * (mask > 0.5)


def denoise_loss(model: ImageDenoiser, clean: torch.Tensor, mask: torch.Tensor, config: DenoiserTrainConfig,
                 generator: torch.Generator, labels: torch.Tensor | None = None, crop: int = 0) -> torch.Tensor:
    """MSE between the network's output for a corrupted batch and the clean batch; with ``crop`` > 0 on
    one random ``crop`` x ``crop`` window per slice (the noise is drawn on the whole slice first, so its
    blobs keep their size)."""
    noisy = corrupt(clean, mask, config, generator)
    if crop and crop < clean.shape[-1]:
        both = random_crops(torch.cat([noisy, clean], dim=1), crop, generator)
        noisy, clean = both[:, :1], both[:, 1:]
    return F.mse_loss(model(noisy, labels), clean)


@torch.no_grad()
def validation_mse(model: ImageDenoiser, val: SliceSet, config: DenoiserTrainConfig, labels: torch.Tensor | None,
                   seed: int = 1234, batch: int = 32) -> float:
    """Denoising MSE on validation slices with fixed noise (comparable between checks)."""
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    total = 0.0
    for start in range(0, len(val), batch):
        x = val.images[start:start + batch].float()
        m = val.masks[start:start + batch].float()
        lab = labels[start:start + batch] if labels is not None else None
        total += float(denoise_loss(model, x, m, config, generator, lab)) * len(x)
    model.train()
    return total / max(len(val), 1)


def start_from(unet: torch.nn.Module, classes: tuple[str, ...], folder: str | os.PathLike[str]) -> None:
    """Load the weights of a saved restoration stage (a model folder or its ``healer/``) into ``unet``;
    refuses one of another layout or trained on other contrast classes, naming what differs."""
    path = Path(folder)
    if (path / "healer").is_dir():
        path = path / "healer"
    if not (path / "unet").is_dir():
        raise ConfigError(f"denoiser.init_from {folder}: no restoration stage there (no unet/ folder in it or in "
                          "its healer/); name a model folder of kind image-dae, e.g. anomaly/assets/models/default")
    start = ImageDenoiser.from_pretrained(path)
    if tuple(start.config.classes) != tuple(classes):
        raise ConfigError(f"denoiser.init_from {folder} was trained on contrast classes {list(start.config.classes)}, "
                          f"this recipe has {list(classes)}: train from scratch (no init_from) or give it the same "
                          "contrasts")
    try:
        unet.load_state_dict(start.unet.float().state_dict())
    except RuntimeError as error:
        raise ConfigError(f"denoiser.init_from {folder} has another network layout than denoiser.block_out_channels "
                          f"and layers_per_block of this recipe ({str(error).splitlines()[0]}): make them match "
                          "its config or train from scratch") from None


def crop_phase(config: DenoiserTrainConfig, step: int) -> bool:
    """Whether ``step`` trains on crops (cheaper) rather than whole slices (the GroupNorm statistics of scoring)."""
    return bool(config.crop_size) and (not config.crop_until_step or step < config.crop_until_step)


def train_denoiser(train: SliceSet, val: SliceSet | None, config: DenoiserTrainConfig,
                   out_dir: str | os.PathLike[str], *, slice_size: int, augment: AugmentConfig | None = None,
                   seed: int = 0, resume: bool = True, progress: bool = True,
                   log: Logger | None = None) -> TrainResult:
    """Train the denoising UNet on augmented healthy slices with EMA; returns an :class:`ImageDenoiser`
    (EMA weights) in ``TrainResult.model``. Resumes from ``out_dir/denoiser_checkpoint.pt``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = log or (lambda line: None)
    generator = seed_everything(seed)
    transform = build_augmentation(augment or AugmentConfig(), seed=seed)
    present = tuple(c for c in CONTRASTS if c in set(train.contrasts))
    all_y = contrast_labels(train.contrasts, present)
    weights = sampling_weights(all_y, config.balance_contrasts)
    classes = present if config.class_conditional else ()
    val_y = contrast_labels(val.contrasts, classes) if classes and val is not None and len(val) else None
    log(f"denoiser slices per contrast {dict(zip((*present, 'unknown'), torch.bincount(all_y).tolist(), strict=False))}"
        f"{', drawn equally often' if weights is not None else ''}")
    unet = build_denoiser_unet(config.block_out_channels, config.layers_per_block, slice_size,
                               len(classes) + 1 if classes else 0)
    model = ImageDenoiser(unet, DenoiserConfig(classes=classes, noise_std=tuple(config.noise_std),  # type: ignore[arg-type]
                                               noise_grid=config.noise_grid))
    if config.init_from and not (resume and (out_dir / CHECKPOINT).is_file()):
        start_from(unet, classes, config.init_from)
        log(f"denoiser initialised from {config.init_from}")
    ema = EMAModel(unet.parameters(), decay=config.ema_decay, use_ema_warmup=True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=1e-4)
    loop = TrainingLoop(LoopSettings("denoiser", config.max_steps, "val_mse", config.max_minutes, config.val_every,
                                     config.patience), out_dir / CHECKPOINT,
                        {"model": unet, "optimizer": optimizer, "ema": ema}, generator, log=log, progress=progress)
    if resume and loop.resume() is not None:
        transform.set_random_state(seed=(seed + loop.step) % (2**32))

    def step(index: int) -> dict[str, float]:
        crop = config.crop_size if crop_phase(config, index) else 0
        size = config.batch_size if crop else (config.full_batch_size or config.batch_size)
        if weights is not None:
            picks = torch.multinomial(weights, size, replacement=True, generator=generator)
        else:
            picks = torch.randint(0, len(train), (size,), generator=generator)
        clean = augment_batch(transform, train.images[picks].float(), train.masks[picks].float())
        masks = (clean > 0).float()  # the brain after the augmentation's warp
        labels = None
        if classes:
            labels = all_y[picks].clone()
            labels[torch.rand(len(labels), generator=generator) < config.uncond_prob] = len(classes)
        settings = config if index >= config.blob_from_step else replace(config, blob_probability=0.0)
        loss = denoise_loss(model, clean, masks, settings, generator, labels, crop=crop)
        optimise(loss, unet, optimizer, ema)
        return {"mse": float(loss.detach())}

    def validate() -> dict[str, float]:
        with ema_weights(ema, unet):
            return {"val_mse": validation_mse(model, val, config, val_y)}  # type: ignore[arg-type]

    model.train()
    outcome = loop.run(step, validate if val is not None and len(val) else None)
    final = copy.deepcopy(model)
    ema.copy_to(final.unet.parameters())
    final.eval()
    return TrainResult(final, outcome.step, outcome.history, outcome.best_val, outcome.stopped)

"""Training of the latent restoration stage: a diffusers ``UNet2DModel`` learns (epsilon prediction,
DDPM noise schedule) the distribution of a frozen VAE's latents of healthy slices, scaled to unit std."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from anomaly.contrast import CONTRASTS
from anomaly.models.restoration import HealerConfig, LatentDiffusionHealer
from anomaly.training.augment import AugmentConfig, augment_batch, build_augmentation
from anomaly.training.common import Logger, TrainResult, seed_everything
from anomaly.training.config import HealerTrainConfig
from anomaly.training.data import SliceSet
from anomaly.training.loop import LoopSettings, TrainingLoop, ema_weights, optimise
from anomaly.training.vae import autocast

CHECKPOINT = "healer_checkpoint.pt"


def build_unet(config: HealerTrainConfig, latent_channels: int, latent_size: int,
               num_classes: int = 0) -> UNet2DModel:
    """A ``UNet2DModel`` over latents; attention in the blocks that ``config.attention`` marks; with
    ``num_classes`` > 0 a class embedding (one class per contrast plus "unknown")."""
    channels = tuple(int(c) for c in config.block_out_channels)
    attention = tuple(bool(a) for a in config.attention)
    if len(attention) != len(channels):
        raise ValueError(f"healer.attention {attention} needs one entry per block of {channels}")
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    groups = min(32, channels[0])
    return UNet2DModel(sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
                       block_out_channels=channels, down_block_types=down, up_block_types=up,
                       layers_per_block=config.layers_per_block, norm_num_groups=groups,
                       attention_head_dim=min(32, channels[-1]),
                       num_class_embeds=num_classes or None)


@torch.no_grad()
def encode_slices(vae: AutoencoderKL, slices: SliceSet, *, copies: int = 1, augment: AugmentConfig | None = None,
                  seed: int = 0, batch: int = 64, bf16: bool = True, progress: bool = False) -> torch.Tensor:
    """Posterior-mode latents (as scoring uses them) of every slice: the plain slices, then
    ``copies - 1`` augmented passes. Returns float32 ``[N * copies, C, h, w]``."""
    vae.eval()
    transform = build_augmentation(augment or AugmentConfig(), seed=seed)
    out = []
    total = copies * len(slices)
    bar = tqdm(total=total, desc="encode", unit="slice", disable=not progress, mininterval=5)
    for copy_index in range(copies):
        for start in range(0, len(slices), batch):
            x = slices.images[start:start + batch].float()
            if copy_index > 0:
                x = augment_batch(transform, x, slices.masks[start:start + batch])
            with autocast(bf16):
                z = vae.encode((x * 2 - 1).contiguous(memory_format=torch.channels_last)).latent_dist.mode()
            out.append(z.float())
            bar.update(len(x))
    bar.close()
    return torch.cat(out)


def _epsilon_loss(unet: UNet2DModel, scheduler: DDPMScheduler, z: torch.Tensor, generator: torch.Generator,
                  bf16: bool, labels: torch.Tensor | None = None) -> torch.Tensor:
    noise = torch.randn(z.shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (z.shape[0],), generator=generator)
    noisy = scheduler.add_noise(z, noise, t)
    with autocast(bf16):
        eps = unet(noisy, t, class_labels=labels).sample
    return F.mse_loss(eps.float(), noise)


@torch.no_grad()
def validation_mse(unet: UNet2DModel, scheduler: DDPMScheduler, latents: torch.Tensor, bf16: bool,
                   seed: int = 1234, batch: int = 128, labels: torch.Tensor | None = None) -> float:
    """Epsilon MSE on validation latents with fixed noise and timesteps (comparable between checks)."""
    generator = torch.Generator().manual_seed(seed)
    unet.eval()
    total = 0.0
    for start in range(0, len(latents), batch):
        z = latents[start:start + batch]
        lab = labels[start:start + batch] if labels is not None else None
        total += float(_epsilon_loss(unet, scheduler, z, generator, bf16, lab)) * len(z)
    unet.train()
    return total / max(len(latents), 1)


def contrast_labels(contrasts: list[str], classes: tuple[str, ...], copies: int = 1) -> torch.Tensor:
    """Class index per latent (``copies`` passes over the slices, as :func:`encode_slices` orders them)."""
    index = [classes.index(c) if c in classes else len(classes) for c in contrasts]
    return torch.tensor(index * copies, dtype=torch.long)


def sampling_weights(labels: torch.Tensor, balance: bool) -> torch.Tensor | None:
    """Per-latent weights that draw every class equally often (None: uniform)."""
    if not balance:
        return None
    counts = torch.bincount(labels).float()
    return 1.0 / counts[labels]


def train_healer(vae: AutoencoderKL, train: SliceSet, val: SliceSet | None, config: HealerTrainConfig,
                 out_dir: str | os.PathLike[str], *, augment: AugmentConfig | None = None, seed: int = 0,
                 resume: bool = True, progress: bool = True, log: Logger | None = None) -> TrainResult:
    """Encode healthy slices with the frozen VAE, normalise latents to unit std, train the UNet with EMA;
    returns a :class:`LatentDiffusionHealer` (EMA weights, DDIM scheduler) in ``TrainResult.model``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = log or (lambda line: None)
    generator = seed_everything(seed)
    vae.requires_grad_(False)
    latents_path = out_dir / "healer_latents.pt"
    cached = torch.load(latents_path, weights_only=True) if resume and latents_path.is_file() else None
    if cached is not None and cached["train"].shape[0] == len(train) * config.augmented_copies:
        train_z, val_z = cached["train"], cached["val"]
    else:
        train_z = encode_slices(vae, train, copies=config.augmented_copies, augment=augment, seed=seed,
                                bf16=config.bf16, progress=progress)
        val_z = encode_slices(vae, val, bf16=config.bf16) if val is not None and len(val) else train_z[:0]
        torch.save({"train": train_z, "val": val_z}, latents_path)
    mean = float(train_z.mean())
    scale = 1.0 / max(float(train_z.std()), 1e-6)
    train_z = (train_z - mean) * scale
    val_z = (val_z - mean) * scale
    log(f"healer latents: {tuple(train_z.shape)} train, {tuple(val_z.shape)} val; mean {mean:.4g}, scale {scale:.4g}")

    present = tuple(c for c in CONTRASTS if c in set(train.contrasts))
    all_y = contrast_labels(train.contrasts, present, config.augmented_copies)
    weights = sampling_weights(all_y, config.balance_contrasts)
    log(f"healer latents per contrast {dict(zip((*present, 'unknown'), torch.bincount(all_y).tolist(), strict=False))}"
        f"{', drawn equally often' if weights is not None else ''}")
    classes = present if config.class_conditional else ()
    train_y = all_y if classes else None
    val_y = contrast_labels(val.contrasts, classes) if classes and val is not None and len(val_z) else None
    unet = build_unet(config, int(train_z.shape[1]), int(train_z.shape[-1]), len(classes) + 1 if classes else 0)
    scheduler = DDPMScheduler(num_train_timesteps=config.num_train_timesteps, clip_sample=False)
    ema = EMAModel(unet.parameters(), decay=config.ema_decay, use_ema_warmup=True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=1e-4)
    loop = TrainingLoop(LoopSettings("healer", config.max_steps, "val_mse", config.max_minutes, config.val_every,
                                     config.patience), out_dir / CHECKPOINT,
                        {"model": unet, "optimizer": optimizer, "ema": ema}, generator, log=log, progress=progress)
    if resume:
        loop.resume()

    def step(index: int) -> dict[str, float]:
        if weights is not None:
            picks = torch.multinomial(weights, config.batch_size, replacement=True, generator=generator)
        else:
            picks = torch.randint(0, len(train_z), (config.batch_size,), generator=generator)
        labels = None
        if train_y is not None:
            labels = train_y[picks].clone()
            labels[torch.rand(len(labels), generator=generator) < config.uncond_prob] = len(classes)
        loss = _epsilon_loss(unet, scheduler, train_z[picks], generator, config.bf16, labels)
        optimise(loss, unet, optimizer, ema)
        return {"mse": float(loss.detach())}

    def validate() -> dict[str, float]:
        with ema_weights(ema, unet):
            return {"val_mse": validation_mse(unet, scheduler, val_z, config.bf16, labels=val_y)}

    unet.train()
    outcome = loop.run(step, validate if len(val_z) else None)
    final = copy.deepcopy(unet)
    ema.copy_to(final.parameters())
    final.eval()
    ddim = DDIMScheduler.from_config(scheduler.config)
    healer = LatentDiffusionHealer(final, ddim, HealerConfig(
        t0=config.t0, steps=config.steps, draws=config.draws, latent_mean=mean, latent_scale=scale, classes=classes,
        t0_by_contrast=dict(config.t0_by_contrast)))
    return TrainResult(healer, outcome.step, outcome.history, outcome.best_val, outcome.stopped)

"""Restoration stages: turn the latent of an abnormal slice into the latent of plausible normal anatomy.

A plain autoencoder copies lesions into its reconstruction; a restoration stage trained on healthy
latents replaces them, so the difference between reconstruction and restoration points at disease.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import DDIMScheduler, UNet2DModel

from anomaly.configparse import build, load_json
from anomaly.contrast import by_contrast, class_index

if TYPE_CHECKING:
    from anomaly.models.denoiser import ImageDenoiser

HEALER_CONFIG = "healer.json"


@dataclass(frozen=True)
class HealerConfig:
    """Partial noising depth ``t0`` (of the scheduler's training steps), DDIM steps back, noise draws,
    the affine latent normalisation (``(z - latent_mean) * latent_scale``) the UNet was trained on, and
    for a class-conditional UNet the contrasts of its classes (one more class, last, is "unknown")."""

    kind: str = "latent-ddim"
    t0: int = 250
    steps: int = 5
    draws: int = 1
    latent_mean: float = 0.0
    latent_scale: float = 1.0
    classes: tuple[str, ...] = ()
    t0_by_contrast: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(self, "t0_by_contrast", {str(k): int(v) for k, v in dict(self.t0_by_contrast or {}).items()})

    def t0_for(self, contrast: str | None) -> int:
        """The healing depth for a scan of ``contrast`` (``t0_by_contrast`` overrides ``t0``)."""
        return by_contrast(self.t0_by_contrast, contrast, self.t0)

    def class_index(self, contrast: str | None) -> int:
        """The UNet class of a contrast (:func:`anomaly.contrast.class_index`)."""
        return class_index(self.classes, contrast)


class LatentDiffusionHealer(torch.nn.Module):
    """A diffusers ``UNet2DModel`` + ``DDIMScheduler`` trained on latents of healthy slices: noise the
    latent part-way (``t0``) and denoise it back, which keeps normal anatomy and drops the abnormal."""

    def __init__(self, unet: UNet2DModel, scheduler: DDIMScheduler, config: HealerConfig) -> None:
        super().__init__()
        self.unet = unet
        self.scheduler = scheduler
        self.config = config

    def timesteps(self, contrast: str | None = None) -> list[int]:
        """The DDIM timesteps from the contrast's ``t0`` down, ``steps`` of them."""
        total = int(self.scheduler.config.num_train_timesteps)
        t0 = min(max(int(self.config.t0_for(contrast)), 1), total - 1)
        n = max(1, int(round(self.config.steps * total / t0)))
        self.scheduler.set_timesteps(n)
        return [int(t) for t in self.scheduler.timesteps if int(t) <= t0]

    @torch.inference_mode()
    def heal(self, z: torch.Tensor, generator: torch.Generator | None = None,
             contrast: str | None = None) -> torch.Tensor:
        """Restore a batch of latents ``[B, C, h, w]`` (towards normal anatomy of ``contrast`` when the
        UNet is class-conditional)."""
        cfg = self.config
        zs = (z - cfg.latent_mean) * cfg.latent_scale
        steps = self.timesteps(contrast)
        if not steps:
            return z
        labels = None
        if cfg.classes:
            labels = torch.full((z.shape[0],), cfg.class_index(contrast), dtype=torch.long, device=z.device)
        noise = torch.randn(zs.shape, generator=generator, dtype=zs.dtype, device="cpu").to(zs.device)
        sample = self.scheduler.add_noise(zs, noise, torch.tensor([steps[0]]))
        for t in steps:
            eps = self.unet(sample, t, class_labels=labels).sample
            sample = self.scheduler.step(eps, t, sample).prev_sample
        return sample / cfg.latent_scale + cfg.latent_mean

    def save_pretrained(self, folder: str | os.PathLike[str]) -> None:
        folder = Path(folder)
        self.unet.save_pretrained(folder / "unet", safe_serialization=True)
        self.scheduler.save_pretrained(folder / "scheduler")
        (folder / HEALER_CONFIG).write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], **overrides: Any) -> LatentDiffusionHealer:
        folder = Path(folder)
        data = load_json(folder / HEALER_CONFIG, HEALER_CONFIG)
        data.update({k: v for k, v in overrides.items() if v is not None})
        config = build(HealerConfig, data, source=folder / HEALER_CONFIG)
        unet = UNet2DModel.from_pretrained(folder / "unet")
        scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
        return cls(unet.eval(), scheduler, config)


def load_restoration(folder: str | os.PathLike[str], **overrides: Any) -> LatentDiffusionHealer | ImageDenoiser:
    """Load the restoration stage stored in ``folder`` by the kind its config names: ``latent-ddim`` (the
    latent diffusion healer) or ``image-dae`` (:class:`anomaly.models.denoiser.ImageDenoiser`)."""
    from anomaly.models.denoiser import DENOISER_KIND, ImageDenoiser  # imports this module's HEALER_CONFIG

    folder = Path(folder)
    kind = load_json(folder / HEALER_CONFIG, HEALER_CONFIG).get("kind", "latent-ddim")
    if kind == DENOISER_KIND:
        return ImageDenoiser.from_pretrained(folder, **overrides)
    if kind != "latent-ddim":
        raise ValueError(f"{folder}: unknown restoration kind {kind!r}; known: latent-ddim, {DENOISER_KIND}")
    return LatentDiffusionHealer.from_pretrained(folder, **overrides)

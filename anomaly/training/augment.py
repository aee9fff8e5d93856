"""MONAI dictionary augmentation of training slices: small affine and elastic warps, intensity
scale and shift, bias field, Gaussian noise; the result is clipped to [0, 1] and zero outside the brain."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    MapTransform,
    Rand2DElasticd,
    RandAffined,
    RandBiasFieldd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
)


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and magnitudes of each augmentation (0 probability turns one off)."""

    affine_prob: float = 0.5
    rotate_rad: float = 0.12
    scale: float = 0.06
    translate_px: float = 6.0
    elastic_prob: float = 0.1
    scale_intensity: float = 0.1
    shift_intensity: float = 0.05
    intensity_prob: float = 0.5
    bias_field_prob: float = 0.3
    bias_field_coeff: float = 0.15
    noise_prob: float = 0.3
    noise_std: float = 0.015


class MaskAndClipd(MapTransform):
    """Zero the image outside the (warped) brain mask and clip it to [0, 1], as scoring inputs are."""

    def __init__(self, image_key: str = "image", mask_key: str = "mask") -> None:
        super().__init__([image_key, mask_key])
        self.image_key, self.mask_key = image_key, mask_key

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        out = dict(data)
        mask = torch.as_tensor(out[self.mask_key]) > 0.5
        out[self.image_key] = torch.as_tensor(out[self.image_key]).clamp(0, 1) * mask
        out[self.mask_key] = mask.float()
        return out


def build_augmentation(config: AugmentConfig, seed: int = 0) -> Compose:
    """The augmentation chain for ``{"image": [1, H, W], "mask": [1, H, W]}`` dictionaries."""
    keys = ["image", "mask"]
    chain: list[Any] = []
    if config.affine_prob > 0:
        chain.append(RandAffined(keys, prob=config.affine_prob, rotate_range=config.rotate_rad,
                                 scale_range=config.scale, translate_range=config.translate_px,
                                 mode=("bilinear", "nearest"), padding_mode="zeros"))
    if config.elastic_prob > 0:
        chain.append(Rand2DElasticd(keys, spacing=(24, 24), magnitude_range=(0.5, 1.5), prob=config.elastic_prob,
                                    mode=("bilinear", "nearest"), padding_mode="zeros"))
    if config.intensity_prob > 0:
        chain.append(RandScaleIntensityd("image", factors=config.scale_intensity, prob=config.intensity_prob))
        chain.append(RandShiftIntensityd("image", offsets=config.shift_intensity, prob=config.intensity_prob))
    if config.bias_field_prob > 0:
        chain.append(RandBiasFieldd("image", coeff_range=(0.0, config.bias_field_coeff), prob=config.bias_field_prob))
    if config.noise_prob > 0:
        chain.append(RandGaussianNoised("image", std=config.noise_std, prob=config.noise_prob))
    chain.append(MaskAndClipd())
    compose = Compose(chain)
    compose.set_random_state(seed=int(np.uint32(seed)))
    return compose


def augment_batch(transform: Compose, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Apply the chain slice by slice to a ``[B, 1, H, W]`` batch; returns float32 images."""
    out = [torch.as_tensor(transform({"image": img.float(), "mask": msk.float()})["image"]).float()
           for img, msk in zip(images, masks, strict=True)]
    return torch.stack(out)

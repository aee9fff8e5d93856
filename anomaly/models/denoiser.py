"""Image-space restoration: a denoising UNet trained to remove coarse noise from healthy slices.

Trained only on normal anatomy, the network learns to pull any blob-sized departure from it back
towards normal tissue (the denoising-autoencoder approach to brain anomaly detection), so at scoring
the clean slice goes in and the difference between it and the network's output points at disease.
It works on the slice itself, not on a VAE latent, so its residual is as sharp as the input.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel

from anomaly.configparse import build, load_json
from anomaly.contrast import class_index
from anomaly.models.fixed_unet import FixedClassUNet, foldable
from anomaly.models.restoration import HEALER_CONFIG

DENOISER_KIND = "image-dae"


@dataclass(frozen=True)
class DenoiserConfig:
    """The contrasts of a class-conditional UNet's classes (one more class, last, is "unknown"), and
    the coarse-noise level it was trained on (recorded for the model card; scoring adds no noise)."""

    kind: str = DENOISER_KIND
    classes: tuple[str, ...] = ()
    noise_std: tuple[float, float] = (0.05, 0.2)
    noise_grid: int = 16
    draws: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(self, "noise_std", tuple(float(v) for v in self.noise_std))

    def class_index(self, contrast: str | None) -> int:
        """The UNet class of a contrast (:func:`anomaly.contrast.class_index`)."""
        return class_index(self.classes, contrast)


class ImageDenoiser(torch.nn.Module):
    """A diffusers ``UNet2DModel`` (timestep fixed at 0) mapping a slice in [0, 1] to its healthy version.

    The UNet predicts the correction, not the slice (residual learning, as in DnCNN): the identity is
    where training starts, so a small network learns to denoise in far fewer steps."""

    space = "image"

    def __init__(self, unet: UNet2DModel, config: DenoiserConfig) -> None:
        super().__init__()
        self.unet = unet
        self.config = config
        self._scoring_dtype: torch.dtype | None = None
        self._fixed: dict[int | None, FixedClassUNet] = {}

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The network's output for a ``[B, 1, H, W]`` batch in [0, 1] (model space is [-1, 1])."""
        t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        if labels is None and self.config.classes:  # a class-conditional UNet needs a class: "unknown"
            labels = torch.full_like(t, len(self.config.classes))
        return x + self.unet(x * 2 - 1, t, class_labels=labels).sample / 2

    def for_scoring(self, dtype: torch.dtype | None = torch.float32) -> ImageDenoiser:
        """Freeze for scoring: :meth:`restore` then runs one :class:`FixedClassUNet` per contrast, built on
        first use from the current weights, in ``dtype`` (bf16: every layer, group norms included, runs in
        bf16, where autocast would compute the norms in fp32 and convert around them) and channels-last
        (oneDNN's faster convolutions). Call it again after changing the weights; ``None`` goes back to
        the UNet as loaded (what training and the speed benchmark's baseline run)."""
        self._scoring_dtype = dtype if dtype is not None and foldable(self.unet) else None
        self._fixed = {}
        return self

    def _fixed_network(self, label: int | None, device: torch.device) -> FixedClassUNet:
        """The frozen network of one class on ``device`` (built once, again after a move)."""
        net = self._fixed.get(label)
        if net is None or next(net.parameters()).device != device:
            net = self._fixed[label] = FixedClassUNet(self.unet, label).to(device=device, dtype=self._scoring_dtype)
        return net

    @torch.inference_mode()
    def restore(self, x: torch.Tensor, contrast: str | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The healthy version of a batch of slices ``[B, 1, H, W]`` in [0, 1] (of ``contrast`` when the
        UNet is class-conditional), clipped to [0, 1] and zero outside the brain: ``mask`` > 0.5 when given,
        else the non-zero input. Give the mask: a lesion darker than the brain's lowest percentile is
        scaled to zero, and without the mask it would count as outside the brain and never show."""
        x = x.float().contiguous(memory_format=torch.channels_last)
        label = self.config.class_index(contrast) if self.config.classes else None
        if self._scoring_dtype is None:
            labels = None if label is None else torch.full((x.shape[0],), label, dtype=torch.long, device=x.device)
            out = self(x, labels)
        else:
            net = self._fixed_network(label, x.device)
            # the network runs in its own dtype: autocast would lift bf16 group norms back to fp32
            with torch.autocast(x.device.type, enabled=False):
                out = x + net((x * 2 - 1).to(net.dtype)).float() / 2
        out = out.clamp(0, 1)
        return out * ((mask > 0.5) if mask is not None else (x > 0))

    def save_pretrained(self, folder: str | os.PathLike[str]) -> None:
        folder = Path(folder)
        self.unet.save_pretrained(folder / "unet", safe_serialization=True)
        (folder / HEALER_CONFIG).write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], **overrides: Any) -> ImageDenoiser:
        folder = Path(folder)
        data = load_json(folder / HEALER_CONFIG, HEALER_CONFIG)
        known = {f.name for f in fields(DenoiserConfig)}  # healing overrides (t0, steps) do not apply here
        data.update({k: v for k, v in overrides.items() if v is not None and k in known})
        config = build(DenoiserConfig, data, source=folder / HEALER_CONFIG)
        unet = UNet2DModel.from_pretrained(folder / "unet")
        return cls(unet.eval(), config)


def build_denoiser_unet(block_out_channels: tuple[int, ...], layers_per_block: int, slice_size: int,
                        num_classes: int = 0) -> UNet2DModel:
    """A 1-channel image ``UNet2DModel`` without attention (cheap on a CPU at 128-192 px); with
    ``num_classes`` > 0 a class embedding (one class per contrast plus "unknown")."""
    channels = tuple(int(c) for c in block_out_channels)
    groups = min(32, channels[0])
    if any(c % groups for c in channels):
        raise ValueError(f"denoiser.block_out_channels {channels} must all be multiples of {groups}")
    return UNet2DModel(sample_size=slice_size, in_channels=1, out_channels=1, block_out_channels=channels,
                       down_block_types=("DownBlock2D",) * len(channels), up_block_types=("UpBlock2D",) * len(channels),
                       layers_per_block=layers_per_block, norm_num_groups=groups,
                       num_class_embeds=num_classes or None)

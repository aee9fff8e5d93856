"""A tiny but faithful copy of the CompVis LDM `AutoencoderKL` for building pickled test checkpoints.

The classes claim the module names of the real code (`ldm.models.autoencoder`, `taming...`,
`pytorch_lightning...`); `fake_ldm_modules()` registers those modules only while saving, so a
loader that imported them would fail afterwards.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import sys
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

MODEL = "ldm.modules.diffusionmodules.model"
DISTRIBUTIONS = "ldm.modules.distributions.distributions"
AUTOENCODER = "ldm.models.autoencoder"
CONTPERCEPTUAL = "ldm.modules.losses.contperceptual"
LPIPS_MODULE = "taming.modules.losses.lpips"
DISCRIMINATOR = "taming.modules.discriminator.model"
LIGHTNING = "pytorch_lightning.core.module"
PARSING = "pytorch_lightning.utilities.parsing"


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    """Swish, as LDM writes it."""
    return x * torch.sigmoid(x)


def normalize(in_channels: int) -> nn.GroupNorm:
    """LDM's `Normalize`: 32 groups, eps 1e-6."""
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution."""

    __module__ = MODEL

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    """Asymmetric zero pad (right, bottom) then a stride-2 3x3 convolution."""

    __module__ = MODEL

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """Norm-swish-conv twice with a 1x1 `nin_shortcut` when the channel count changes."""

    __module__ = MODEL

    def __init__(self, *, in_channels: int, out_channels: int | None = None, dropout: float = 0.0,
                 temb_channels: int = 0) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q, k, v and output projection."""

    __module__ = MODEL

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.norm = normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        q = q.reshape(b, c, h * w).permute(0, 2, 1)
        k = k.reshape(b, c, h * w)
        w_ = torch.bmm(q, k) * (int(c) ** (-0.5))
        w_ = torch.softmax(w_, dim=2)
        v = v.reshape(b, c, h * w)
        h_ = torch.bmm(v, w_.permute(0, 2, 1)).reshape(b, c, h, w)
        return x + self.proj_out(h_)


class Encoder(nn.Module):
    """LDM encoder: conv_in, levels of resnets (+ downsample), mid block, norm_out, conv_out (double_z)."""

    __module__ = MODEL

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = True,
                 **ignore: Any) -> None:
        super().__init__()
        self.ch, self.temb_ch = ch, 0
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.resolution, self.in_channels = resolution, in_channels
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        curr_res = resolution
        in_ch_mult = (1, *tuple(ch_mult))
        self.in_ch_mult = in_ch_mult
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out,
                                         temb_channels=self.temb_ch, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=0, dropout=dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=0, dropout=dropout)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hs = [self.conv_in(x)]
        for i_level in range(self.num_resolutions):
            for i_block in range(self.num_res_blocks):
                h = self.down[i_level].block[i_block](hs[-1], None)
                if len(self.down[i_level].attn) > 0:
                    h = self.down[i_level].attn[i_block](h)
                hs.append(h)
            if i_level != self.num_resolutions - 1:
                hs.append(self.down[i_level].downsample(hs[-1]))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], None)), None)
        return self.conv_out(nonlinearity(self.norm_out(h)))


class Decoder(nn.Module):
    """LDM decoder: conv_in, mid block, levels built from the lowest resolution up and inserted at 0."""

    __module__ = MODEL

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int, z_channels: int, give_pre_end: bool = False,
                 tanh_out: bool = False, **ignore: Any) -> None:
        super().__init__()
        self.ch, self.temb_ch = ch, 0
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.resolution, self.in_channels = resolution, in_channels
        self.give_pre_end, self.tanh_out = give_pre_end, tanh_out
        block_in = ch * ch_mult[self.num_resolutions - 1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=0, dropout=dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=0, dropout=dropout)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out,
                                         temb_channels=self.temb_ch, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            self.up.insert(0, up)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, None)), None)
        for i_level in reversed(range(self.num_resolutions)):
            for i_block in range(self.num_res_blocks + 1):
                h = self.up[i_level].block[i_block](h, None)
                if len(self.up[i_level].attn) > 0:
                    h = self.up[i_level].attn[i_block](h)
            if i_level != 0:
                h = self.up[i_level].upsample(h)
        h = self.conv_out(nonlinearity(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h


class DiagonalGaussianDistribution:
    """LDM's posterior: mean and clamped log-variance split from the moments."""

    __module__ = DISTRIBUTIONS

    def __init__(self, parameters: torch.Tensor) -> None:
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self) -> torch.Tensor:
        return self.mean + self.std * torch.randn_like(self.mean)

    def mode(self) -> torch.Tensor:
        return self.mean


class AttributeDict(dict):
    """Lightning's hyper-parameter dict (a dict subclass, pickled with SETITEMS)."""

    __module__ = PARSING


class LightningModule(nn.Module):
    """Enough of `pytorch_lightning.LightningModule` to pickle the attributes a real one carries."""

    __module__ = LIGHTNING

    def __init__(self) -> None:
        super().__init__()
        self._hparams = AttributeDict()
        self._device = torch.device("cpu")
        self._dtype = torch.float32
        self._trainer = None
        self._example_input_array = None


class ScalingLayer(nn.Module):
    """LPIPS input scaling with its two registered buffers."""

    __module__ = LPIPS_MODULE

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])


class LPIPS(nn.Module):
    """Stand-in for taming's LPIPS: a scaling layer and a small frozen feature net."""

    __module__ = LPIPS_MODULE

    def __init__(self) -> None:
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
        for param in self.parameters():
            param.requires_grad = False


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator stand-in with BatchNorm (int64 buffers in the pickle)."""

    __module__ = DISCRIMINATOR

    def __init__(self, input_nc: int = 1, ndf: int = 8) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(ndf, ndf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf), nn.LeakyReLU(0.2), nn.Conv2d(ndf, 1, 4, 1, 1),
        )


class LPIPSWithDiscriminator(nn.Module):
    """Training loss of the KL autoencoder: LPIPS, a discriminator and a learned log-variance."""

    __module__ = CONTPERCEPTUAL

    def __init__(self, disc_in_channels: int = 1) -> None:
        super().__init__()
        self.kl_weight = 1e-6
        self.perceptual_loss = LPIPS().eval()
        self.logvar = nn.Parameter(torch.ones(size=()) * 0.0)
        self.discriminator = NLayerDiscriminator(input_nc=disc_in_channels)


class AutoencoderKL(LightningModule):
    """The LDM KL autoencoder module as pickled whole by `torch.save(model)`."""

    __module__ = AUTOENCODER

    def __init__(self, ddconfig: dict[str, Any], embed_dim: int, image_key: str = "image") -> None:
        super().__init__()
        self.image_key = image_key
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = LPIPSWithDiscriminator(disc_in_channels=ddconfig["out_ch"])
        assert ddconfig["double_z"]
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim
        self._hparams.update({"embed_dim": embed_dim, "ddconfig": dict(ddconfig)})

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True) -> tuple[torch.Tensor, Any]:
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior


class ShellPayload:
    """Runs a shell command when unpickled by a plain unpickler (`os.system`)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch '{self.marker}'",))


class OpenPayload:
    """Creates a file when unpickled by a plain unpickler (`builtins.open` in write mode)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.open, (str(self.marker), "w"))


_CLASSES: tuple[type, ...] = (
    Upsample, Downsample, ResnetBlock, AttnBlock, Encoder, Decoder, DiagonalGaussianDistribution,
    AttributeDict, LightningModule, ScalingLayer, LPIPS, NLayerDiscriminator, LPIPSWithDiscriminator,
    AutoencoderKL,
)
FAKE_TOP_LEVEL = ("ldm", "taming", "pytorch_lightning")


@contextlib.contextmanager
def fake_ldm_modules() -> Iterator[None]:
    """Register the stand-in modules (and their parent packages) in `sys.modules` for pickling only."""
    added: list[str] = []
    for cls in _CLASSES:
        parts = cls.__module__.split(".")
        for depth in range(1, len(parts) + 1):
            name = ".".join(parts[:depth])
            if name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
                added.append(name)
        module = sys.modules[cls.__module__]
        setattr(module, cls.__qualname__, cls)
        if cls.__module__ in added:
            module.__file__ = __file__  # lets legacy torch.save embed the class source, as real files do
    try:
        yield
    finally:
        for name in reversed(added):
            sys.modules.pop(name, None)


def ddconfig(ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int = 4,
             resolution: int = 32) -> dict[str, Any]:
    """An LDM `ddconfig` for a 1-channel kl autoencoder (attention in the mid block only)."""
    return {
        "double_z": True, "z_channels": z_channels, "resolution": resolution, "in_channels": 1, "out_ch": 1,
        "ch": ch, "ch_mult": list(ch_mult), "num_res_blocks": num_res_blocks, "attn_resolutions": [],
        "dropout": 0.0,
    }


def build_ldm_autoencoder(ch: int = 32, ch_mult: Sequence[int] = (1, 2), num_res_blocks: int = 1,
                          z_channels: int = 4, seed: int = 0) -> AutoencoderKL:
    """A small LDM autoencoder with non-trivial (randomised) norms and biases, in eval mode."""
    torch.manual_seed(seed)
    model = AutoencoderKL(ddconfig(ch, ch_mult, num_res_blocks, z_channels), embed_dim=z_channels)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


@torch.no_grad()
def ldm_reconstruct(model: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """Deterministic reconstruction: encoder mean, then decoder."""
    return model.decode(model.encode(x).mode())


def save_pickled_module(model: nn.Module, path: Path, *, zip_format: bool = True, **extra: Any) -> Path:
    """`torch.save` the whole module (with extra attributes such as payloads set on it first)."""
    for name, value in extra.items():
        setattr(model, name, value)
    with fake_ldm_modules():
        torch.save(model, path, _use_new_zipfile_serialization=zip_format)
    for name in extra:
        delattr(model, name)
    return path

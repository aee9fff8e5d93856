"""Tests for the denoiser's scoring network: the UNet frozen to one class, its time and class embedding
folded into biases, computes what the diffusers UNet computes, in fp32 to rounding and in bf16 close to it."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel

from anomaly.models.denoiser import DenoiserConfig, ImageDenoiser, build_denoiser_unet
from anomaly.models.fixed_unet import FixedClassUNet, NarrowGroupNorm, foldable


def _unet(classes: int = 4, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    unet = build_denoiser_unet((8, 16, 32), layers_per_block=1, slice_size=32, num_classes=classes).eval()
    with torch.no_grad():  # a freshly built UNet zeroes its last convolution: give every weight a value
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet


def _plain(unet: UNet2DModel, x: torch.Tensor, label: int | None) -> torch.Tensor:
    labels = None if label is None else torch.full((x.shape[0],), label, dtype=torch.long)
    with torch.inference_mode():
        return unet(x, torch.zeros(x.shape[0], dtype=torch.long), class_labels=labels).sample


@pytest.mark.parametrize("label", [0, 2, 3])
def test_fixed_class_unet_computes_what_the_unet_computes(label: int) -> None:
    unet = _unet()
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    fixed = FixedClassUNet(unet, label)
    with torch.inference_mode():
        out = fixed(x)
        out_cl = fixed(x.contiguous(memory_format=torch.channels_last))
    ref = _plain(unet, x, label)
    assert float(ref.abs().max()) > 0.1  # a non-trivial output to compare
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_cl, ref, atol=1e-5, rtol=1e-5)
    other = _plain(unet, x, (label + 1) % 4)
    assert float((out - other).abs().max()) > 1e-3  # the class is really baked in
    # the embedding now lives in the biases: no residual block projects one any more
    assert all(getattr(m, "time_emb_proj", "none") is None for m in fixed.modules() if hasattr(m, "time_emb_proj"))


def test_fixed_class_unet_without_classes_and_refusals() -> None:
    unet = _unet(classes=0)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.inference_mode():
        torch.testing.assert_close(FixedClassUNet(unet, None)(x), _plain(unet, x, None), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs a class"):
        FixedClassUNet(_unet(), None)
    shifted = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                          down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                          layers_per_block=1, norm_num_groups=8, resnet_time_scale_shift="scale_shift")
    assert not foldable(shifted)
    with pytest.raises(ValueError, match="cannot be folded"):
        FixedClassUNet(shifted, None)
    assert not ImageDenoiser(shifted, DenoiserConfig()).for_scoring(torch.float32)._scoring_dtype  # plain UNet


def test_narrow_group_norm_keeps_values_and_layout() -> None:
    norm = torch.nn.GroupNorm(4, 8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    fast = NarrowGroupNorm(4, 8)
    fast.load_state_dict(norm.state_dict())
    x = (torch.randn(2, 8, 12, 12) * 3 + 5).contiguous(memory_format=torch.channels_last)
    for dtype in (torch.float32, torch.bfloat16):
        fast.to(dtype)
        norm.to(dtype)
        out = fast(x.to(dtype))
        assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == dtype
        torch.testing.assert_close(out, norm(x.to(dtype).contiguous()))
        torch.testing.assert_close(fast(x.to(dtype).contiguous()), norm(x.to(dtype).contiguous()))
    fixed = FixedClassUNet(_unet(), 0)  # its 8-channel norms are narrow, its wider ones plain
    kinds = {(type(m).__name__, m.num_channels) for m in fixed.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert ("NarrowGroupNorm", 8) in kinds and all(c >= 16 for name, c in kinds if name == "GroupNorm")


def test_restore_for_scoring_matches_the_plain_unet_and_follows_new_weights() -> None:
    den = ImageDenoiser(_unet(), DenoiserConfig(classes=("t1", "t2", "flair"))).eval()
    x = torch.rand(4, 1, 32, 32)
    mask = torch.ones_like(x)
    plain = den.for_scoring(None).restore(x, "t2", mask)
    fp32 = den.for_scoring(torch.float32).restore(x, "t2", mask)
    torch.testing.assert_close(fp32, plain, atol=1e-5, rtol=1e-5)
    bf16 = den.for_scoring(torch.bfloat16).restore(x, "t2", mask)
    assert bf16.dtype == torch.float32 and float((bf16 - plain).abs().max()) < 0.05
    assert float((den.restore(x, "flair", mask) - bf16).abs().max()) > 1e-3  # one network per contrast
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the slice model calls it for bf16 scoring
        torch.testing.assert_close(den.restore(x, "t2", mask), bf16)
    with torch.no_grad():
        den.unet.conv_out.bias.add_(0.1)
    den.for_scoring(torch.float32)
    torch.testing.assert_close(den.restore(x, "t2", mask), den.for_scoring(None).restore(x, "t2", mask),
                               atol=1e-5, rtol=1e-5)

"""A diffusers ``UNet2DModel`` frozen to one timestep and one class, for fast inference on a CPU.

The image denoiser always runs at timestep 0 with the scan's contrast as its class, so every residual
block adds the same per-channel constant (its projection of the time and class embedding) after its
first convolution. Folding that constant into the convolution's bias gives the same function without
the broadcast add, which on channels-last tensors costs as much as the convolution it follows. Narrow
group norms in bf16 go through the contiguous layout, where PyTorch's CPU kernel is 3x faster for them. Only the plain block types the denoiser uses are folded; others keep the full model.
"""

from __future__ import annotations

import copy

import torch
from diffusers import UNet2DModel
from diffusers.models.resnet import ResnetBlock2D


class NarrowGroupNorm(torch.nn.GroupNorm):
    """A group norm over fewer than 16 channels that computes bf16 channels-last input on the contiguous
    layout and hands back the layout it was given (the same values as ``nn.GroupNorm``): there PyTorch's
    channels-last CPU kernel is 3x slower than the contiguous one, while for fp32, or 16 channels and
    more, it is the faster one (measured at 8 and 16 channels, 64-192 px, on an AVX-512 CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype == torch.bfloat16 and x.dim() == 4 and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last)):
            return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)
        return super().forward(x)


def _narrow_group_norm(norm: torch.nn.GroupNorm) -> torch.nn.GroupNorm:
    """``norm`` as a :class:`NarrowGroupNorm` (same parameters) when it has fewer than 16 channels."""
    if norm.num_channels >= 16 or type(norm) is not torch.nn.GroupNorm:
        return norm
    out = NarrowGroupNorm(norm.num_groups, norm.num_channels, eps=norm.eps, affine=norm.affine)
    out.load_state_dict(norm.state_dict())
    return out


def foldable(unet: UNet2DModel) -> bool:
    """Whether :class:`FixedClassUNet` can fold this UNet: positional time embedding, additive time
    conditioning in every residual block, and no skip-sample blocks."""
    cfg = unet.config
    if cfg.time_embedding_type != "positional" or cfg.center_input_sample or cfg.class_embed_type is not None:
        return False
    blocks = [*unet.down_blocks, *unet.up_blocks]
    if any(hasattr(block, "skip_conv") for block in blocks):
        return False
    resnets = [m for m in unet.modules() if isinstance(m, ResnetBlock2D)]
    return all(r.time_embedding_norm == "default" and r.time_emb_proj is not None for r in resnets)


class FixedClassUNet(torch.nn.Module):
    """``unet(sample, 0, class_labels=label).sample`` for one ``label`` (or none), as its own network:
    a channels-last fp32 copy whose residual blocks carry the time and class embedding in their first
    convolution's bias (cast it with ``.to(dtype)``)."""

    def __init__(self, unet: UNet2DModel, label: int | None) -> None:
        super().__init__()
        if not foldable(unet):
            raise ValueError("this UNet's time conditioning cannot be folded; call it directly")
        net = copy.deepcopy(unet).float()
        with torch.no_grad():
            emb = net.time_embedding(net.time_proj(torch.zeros(1, dtype=torch.long, device=net.device)))
            if net.class_embedding is not None:
                if label is None:
                    raise ValueError("a class-conditional UNet needs a class label")
                emb = emb + net.class_embedding(torch.tensor([label], device=net.device))
            for block in net.modules():
                if isinstance(block, ResnetBlock2D) and block.time_emb_proj is not None:
                    temb = emb if block.skip_time_act else block.nonlinearity(emb)
                    shift = block.time_emb_proj(temb)[0]
                    if block.conv1.bias is None:
                        block.conv1.bias = torch.nn.Parameter(torch.zeros_like(shift))
                    block.conv1.bias += shift
                    block.time_emb_proj = None
        for module in list(net.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, torch.nn.GroupNorm):
                    setattr(module, child_name, _narrow_group_norm(child))
        self.net = net.to(memory_format=torch.channels_last).eval().requires_grad_(False)  # casts keep the layout

    @property
    def dtype(self) -> torch.dtype:
        return self.net.dtype

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        """The UNet's output for a ``[B, C, H, W]`` batch (the path of ``UNet2DModel.forward`` without
        the time embedding, now inside the biases)."""
        net = self.net
        sample = net.conv_in(sample)
        skips: tuple[torch.Tensor, ...] = (sample,)
        for block in net.down_blocks:
            sample, res = block(hidden_states=sample, temb=None)
            skips += res
        if net.mid_block is not None:
            sample = net.mid_block(sample, None)
        for block in net.up_blocks:
            n = len(block.resnets)
            sample = block(sample, skips[-n:], None)
            skips = skips[:-n]
        return net.conv_out(net.conv_act(net.conv_norm_out(sample)))

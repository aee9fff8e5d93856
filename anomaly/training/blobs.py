"""Synthetic lesion blobs painted into training slices, so the restoration stage learns to replace
whole abnormal regions (dark or bright, any size) with normal tissue instead of copying them.

Coarse noise alone (the classic denoising objective) only ever shows the network small deviations, so
a large lesion far outside that range passes through the restoration and vanishes from the residual.
Each blob is an ellipse with a randomly roughened edge and a soft border, filled either with a level
anywhere in the slice's intensity range (from black to brighter than any tissue) or with the tissue
shifted by a random offset, inside the brain only; with ``foreign_share`` > 0 that share of the blobs is
filled with *normal tissue from elsewhere* instead (another slice of the batch, moved and maybe mirrored,
blended in at 50-100 %): anatomy in the wrong place, inside the normal intensity range, which a level or a
shift never shows (the foreign-patch idea of self-supervised anomaly detection). All randomness comes
from one ``torch.Generator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class BlobSettings:
    """How many blobs per painted slice, their radius range in pixels, and the share of slices painted."""

    probability: float = 0.5
    count: tuple[int, int] = (1, 3)
    radius_px: tuple[float, float] = (3.0, 14.0)
    foreign_share: float = 0.0
    radius_sampling: str = "uniform"  # or "log": log-uniform, as many blobs per octave of size


RADIUS_SAMPLINGS = ("uniform", "log")


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def draw_radius(radius_px: tuple[float, float], sampling: str, generator: torch.Generator) -> float:
    """One radius in pixels between the bounds: uniform, or log-uniform (``log``), which draws small
    blobs (the size of most MS lesions) as often as large ones instead of rarely."""
    low, high = radius_px
    if sampling == "log":
        return math.exp(_uniform(math.log(low), math.log(high), generator))
    return _uniform(low, high, generator)


def blob_weight(size: tuple[int, int], center: tuple[float, float], radius: tuple[float, float], angle: float,
                generator: torch.Generator) -> torch.Tensor:
    """A ``[H, W]`` weight in [0, 1]: 1 inside a rotated ellipse (``radius`` along y, along x) whose edge
    is roughened by a smooth angular wobble, falling to 0 over a soft border of a third of the radius."""
    h, w = size
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    dy, dx = yy - center[0], xx - center[1]
    cos, sin = math.cos(angle), math.sin(angle)
    u, v = (dx * cos + dy * sin) / radius[1], (-dx * sin + dy * cos) / radius[0]
    distance = torch.sqrt(u * u + v * v)
    theta = torch.atan2(v, u)
    wobble = torch.zeros_like(theta)
    for harmonic in (2, 3, 5):
        amplitude = 0.12 * float(torch.rand((), generator=generator))
        phase = _uniform(0.0, 2 * math.pi, generator)
        wobble += amplitude * torch.cos(harmonic * theta + phase)
    edge = (1.0 + wobble - distance) / 0.33
    return edge.clamp(0, 1) ** 2 * (3 - 2 * edge.clamp(0, 1))  # smoothstep


def foreign_tissue(x: torch.Tensor, mask: torch.Tensor,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal tissue from elsewhere: a random slice of the batch, mirrored left-right half the time and
    moved by up to a third of the slice each way, with where it is brain (``[H, W]`` each)."""
    h, w = x.shape[-2], x.shape[-1]
    j = int(torch.randint(0, x.shape[0], (), generator=generator))
    source, brain = x[j, 0], mask[j, 0] > 0.5
    if float(torch.rand((), generator=generator)) < 0.5:
        source, brain = source.flip(-1), brain.flip(-1)
    shift = (int(torch.randint(-h // 3, h // 3 + 1, (), generator=generator)),
             int(torch.randint(-w // 3, w // 3 + 1, (), generator=generator)))
    return source.roll(shift, dims=(0, 1)), brain.roll(shift, dims=(0, 1))


def paint_blobs(x: torch.Tensor, mask: torch.Tensor, settings: BlobSettings,
                generator: torch.Generator) -> torch.Tensor:
    """A copy of the ``[B, 1, H, W]`` batch (intensities in [0, 1]) with blobs painted into a random
    share of its slices, inside ``mask`` (> 0.5 is brain); slices without brain are left alone."""
    out = x.clone()
    size = (x.shape[-2], x.shape[-1])
    for b in range(x.shape[0]):
        if float(torch.rand((), generator=generator)) >= settings.probability:
            continue
        brain = mask[b, 0] > 0.5
        where = brain.nonzero()
        if len(where) < 16:
            continue
        low, high = settings.count
        for _ in range(int(torch.randint(low, high + 1, (), generator=generator))):
            pick = where[int(torch.randint(0, len(where), (), generator=generator))]
            radius = (draw_radius(settings.radius_px, settings.radius_sampling, generator),
                      draw_radius(settings.radius_px, settings.radius_sampling, generator))
            weight = blob_weight(size, (float(pick[0]), float(pick[1])), radius,
                                 _uniform(0.0, math.pi, generator), generator) * brain
            tissue = out[b, 0]
            if settings.foreign_share and float(torch.rand((), generator=generator)) < settings.foreign_share:
                fill, valid = foreign_tissue(x, mask, generator)
                fill = torch.where(valid, fill, tissue)
                blend = weight * _uniform(0.5, 1.0, generator)
                out[b, 0] = tissue * (1 - blend) + fill * blend
                continue
            if float(torch.rand((), generator=generator)) < 0.6:  # a level of its own, dark to very bright
                fill = torch.full_like(tissue, _uniform(0.0, 1.0, generator))
            else:  # the tissue shifted up or down: its texture shows through
                fill = (tissue + _uniform(-0.5, 0.5, generator)).clamp(0, 1)
            grain = F.interpolate(torch.randn((1, 1, 8, 8), generator=generator), size=size, mode="bilinear",
                                  align_corners=False)[0, 0]
            fill = (fill + 0.03 * grain).clamp(0, 1)
            out[b, 0] = tissue * (1 - weight) + fill * weight
    return out * (x > 0)

"""Slice models built on a diffusers ``AutoencoderKL``: encode, optionally restore, decode, compare."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL

from anomaly.contrast import CONTRASTS
from anomaly.models.base import ModelIdentity, SliceModel, SliceOutput
from anomaly.models.restoration import LatentDiffusionHealer
from anomaly.preprocess import InputSpec, PreparedVolume


@dataclass(frozen=True)
class MapConfig:
    """How the map is formed: ``reference`` minus ``target``, where target is the restored decode when
    a restoration stage exists (else the reconstruction), and ``sign`` keeps abs, positive or negative;
    ``intensity_weight`` adds that multiple of the normalised input above a floor (an intensity term).

    ``intensity_floor`` maps a contrast (t1, t2, flair, or ``unknown``) to a brain intensity percentile:
    only brightness above that percentile of the scan's own brain counts. Bright tissue is normal on
    T1 (white matter), so there a high floor keeps only what is brighter than nearly all normal tissue;
    a contrast not listed counts all brightness (floor 0)."""

    reference: str = "reconstruction"
    sign: str = "abs"
    intensity_weight: float = 0.0
    intensity_floor: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.reference not in ("input", "reconstruction"):
            raise ValueError(f"map.reference must be input or reconstruction, not {self.reference!r}")
        if self.sign not in ("abs", "positive", "negative"):
            raise ValueError(f"map.sign must be abs, positive or negative, not {self.sign!r}")
        if self.intensity_weight < 0:
            raise ValueError(f"map.intensity_weight must be >= 0, not {self.intensity_weight}")
        floors = dict(self.intensity_floor or {})
        for key, value in floors.items():
            if key not in (*CONTRASTS, "unknown"):
                raise ValueError(f"map.intensity_floor: unknown contrast {key!r}; use {', '.join(CONTRASTS)} or unknown")
            if not 0 <= float(value) <= 100:
                raise ValueError(f"map.intensity_floor.{key} must be a percentile in [0, 100], not {value}")
        object.__setattr__(self, "intensity_floor", {k: float(v) for k, v in floors.items()})

    def floor_percentile(self, contrast: str | None) -> float:
        """The brain percentile below which brightness does not count, for a scan of ``contrast``."""
        return self.intensity_floor.get(contrast or "unknown", 0.0)


class AutoencoderSliceModel(SliceModel):
    """A 1- or 3-channel ``AutoencoderKL`` working in [-1, 1] (grey repeated to RGB and averaged back)."""

    def __init__(self, vae: AutoencoderKL, *, name: str, weights_hash: str, input_spec: InputSpec,
                 restoration: LatentDiffusionHealer | None = None, map_config: MapConfig | None = None,
                 precision: str = "fp32", force_fp32: bool = False, extra: dict[str, Any] | None = None) -> None:
        self.vae = vae.eval()
        self.restoration = restoration.eval() if restoration is not None else None
        self.name = name
        self.weights_hash = weights_hash
        self.input_spec = input_spec
        self.map_config = map_config or MapConfig()
        self.force_fp32 = force_fp32
        self.precision = "fp32" if force_fp32 else precision
        self.extra = extra or {}
        self.vae.to(memory_format=torch.channels_last)

    @property
    def in_channels(self) -> int:
        return int(self.vae.config.in_channels)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def to(self, device: str | torch.device) -> AutoencoderSliceModel:
        self.vae.to(device)
        if self.restoration is not None:
            self.restoration.to(device)
        return self

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_model(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 2 - 1
        if self.in_channels != 1:
            y = y.repeat(1, self.in_channels, 1, 1)
        return y.to(self.device).contiguous(memory_format=torch.channels_last)

    @staticmethod
    def _from_model(y: torch.Tensor) -> torch.Tensor:
        return ((y.float().mean(dim=1, keepdim=True) + 1) / 2).clamp(0, 1).cpu()

    @property
    def uses_contrast(self) -> bool:
        return bool(self.map_config.intensity_weight and self.map_config.intensity_floor)

    def volume_context(self, prepared: PreparedVolume) -> float:
        """The intensity floor of this scan: its brain's percentile that the map config names for its contrast."""
        percentile = self.map_config.floor_percentile(prepared.contrast)
        if not self.map_config.intensity_weight or percentile <= 0:
            return 0.0
        values = prepared.image[prepared.mask]
        return float(np.percentile(values, percentile)) if values.size else 0.0

    @torch.inference_mode()
    def score_slices(self, x: torch.Tensor, generator: torch.Generator | None = None,
                     context: Any = None) -> SliceOutput:
        intensity: torch.Tensor | float = 0
        if self.map_config.intensity_weight:  # x >= 0, so a floor of 0 keeps all of it
            intensity = self.map_config.intensity_weight * (x - float(context or 0.0)).clamp_min(0)
        x = x.clamp(0, 1)
        with self._autocast():
            z = self.vae.encode(self._to_model(x)).latent_dist.mode()
            recon = self._from_model(self.vae.decode(z).sample)
            if self.restoration is None:
                residual = _signed(x - recon, self.map_config.sign)
                return SliceOutput(anomaly=residual + intensity, reconstruction=recon)
            draws = max(1, int(self.restoration.config.draws))
            reference = x if self.map_config.reference == "input" else recon
            total = torch.zeros_like(x)
            healed = torch.zeros_like(x)
            for _ in range(draws):
                zh = self.restoration.heal(z.float(), generator=generator).to(z.dtype)
                decoded = self._from_model(self.vae.decode(zh).sample)
                healed += decoded / draws
                total += _signed(reference - decoded, self.map_config.sign) / draws
        return SliceOutput(anomaly=total + intensity, reconstruction=healed)

    def identity(self) -> ModelIdentity:
        config: dict[str, Any] = {
            "vae": dict(self.vae.config), "input_spec": asdict(self.input_spec),
            "map": asdict(self.map_config), "precision": self.precision, **self.extra,
        }
        if self.restoration is not None:
            config["restoration"] = asdict(self.restoration.config)
        return ModelIdentity(name=self.name, weights_hash=self.weights_hash, config=_jsonable(config))


def _signed(diff: torch.Tensor, sign: str) -> torch.Tensor:
    if sign == "positive":
        return diff.clamp_min(0)
    if sign == "negative":
        return (-diff).clamp_min(0)
    return diff.abs()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)

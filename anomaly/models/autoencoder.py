"""Slice models built on a diffusers ``AutoencoderKL``: encode, optionally restore, decode, compare."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from diffusers import AutoencoderKL

from anomaly.contrast import SCAN_CONTRASTS, by_contrast
from anomaly.mapnorm import robust_z
from anomaly.models.base import ModelIdentity, SliceModel, SliceOutput
from anomaly.models.denoiser import ImageDenoiser
from anomaly.models.restoration import LatentDiffusionHealer
from anomaly.preprocess import InputSpec, PreparedVolume

T = TypeVar("T", torch.Tensor, np.ndarray)


@dataclass(frozen=True)
class MapConfig:
    """How the map is formed: ``reference`` minus ``target``, where target is the restored decode when
    a restoration stage exists (else the reconstruction), and ``sign`` keeps abs, positive or negative;
    ``intensity_weight`` adds that multiple of the normalised input above a floor (an intensity term).

    ``intensity_floor`` maps a contrast (t1, t2, flair, or ``unknown``) to a brain intensity percentile:
    only brightness above that percentile of the scan's own brain counts. Bright tissue is normal on
    T1 (white matter), so there a high floor keeps only what is brighter than nearly all normal tissue;
    a contrast not listed counts all brightness (floor 0).

    ``normalise`` (``none``, ``robust`` or ``robust-signed``): with ``robust`` the residual (after its sign
    rule) is centred on its median over the scan's brain and divided by its spread there (MAD, see
    :mod:`anomaly.mapnorm`) before the intensity term is added, so the learned term is on one scale in
    every scan and one threshold serves a batch (the intensity is already on a per-scan scale:
    preprocessing maps the brain's 0.5th-99.5th percentiles to [0, 1]). ``robust-signed`` z-scores the
    *signed* difference (reference minus restored) first and applies the sign rule after: healthy
    tissue's spread is measured where it is stable, not on a term clipped to zero on half the brain;
    the intensity term is then z-scored over the brain as well. ``residual_weight`` multiplies the residual term. ``sign_by_contrast``,
    ``intensity_weight_by_contrast`` and ``residual_weight_by_contrast`` override ``sign``,
    ``intensity_weight`` and ``residual_weight`` for a contrast (t1, t1c, t2, flair, unknown); a ``t1c`` scan
    without settings of its own takes those of ``t1``."""

    reference: str = "reconstruction"
    sign: str = "abs"
    intensity_weight: float = 0.0
    intensity_floor: dict[str, float] = field(default_factory=dict)
    normalise: str = "none"
    residual_weight: float = 1.0
    sign_by_contrast: dict[str, str] = field(default_factory=dict)
    intensity_weight_by_contrast: dict[str, float] = field(default_factory=dict)
    residual_weight_by_contrast: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.reference not in ("input", "reconstruction"):
            raise ValueError(f"map.reference must be input or reconstruction, not {self.reference!r}")
        for key, sign in {"": self.sign, **dict(self.sign_by_contrast or {})}.items():
            if sign not in SIGNS:
                where = f"map.sign_by_contrast.{key}" if key else "map.sign"
                raise ValueError(f"{where} must be abs, positive or negative, not {sign!r}")
        if self.normalise not in NORMALISE:
            raise ValueError(f"map.normalise must be one of {', '.join(NORMALISE)}, not {self.normalise!r}")
        if self.intensity_weight < 0 or self.residual_weight < 0:
            raise ValueError("map.intensity_weight and map.residual_weight must be >= 0")
        floors = _per_contrast("map.intensity_floor", self.intensity_floor)
        for key, value in floors.items():
            if not 0 <= float(value) <= 100:
                raise ValueError(f"map.intensity_floor.{key} must be a percentile in [0, 100], not {value}")
        weights = _per_contrast("map.intensity_weight_by_contrast", self.intensity_weight_by_contrast)
        residual_weights = _per_contrast("map.residual_weight_by_contrast", self.residual_weight_by_contrast)
        if any(float(v) < 0 for v in (*weights.values(), *residual_weights.values())):
            raise ValueError("map.intensity_weight_by_contrast and map.residual_weight_by_contrast values must be >= 0")
        object.__setattr__(self, "residual_weight_by_contrast", {k: float(v) for k, v in residual_weights.items()})
        object.__setattr__(self, "intensity_floor", {k: float(v) for k, v in floors.items()})
        object.__setattr__(self, "intensity_weight_by_contrast", {k: float(v) for k, v in weights.items()})
        object.__setattr__(self, "sign_by_contrast",
                           {k: str(v) for k, v in _per_contrast("map.sign_by_contrast", self.sign_by_contrast).items()})

    def floor_percentile(self, contrast: str | None) -> float:
        """The brain percentile below which brightness does not count, for a scan of ``contrast``."""
        return by_contrast(self.intensity_floor, contrast, 0.0)

    def sign_for(self, contrast: str | None) -> str:
        return by_contrast(self.sign_by_contrast, contrast, self.sign)

    def weight_for(self, contrast: str | None) -> float:
        return by_contrast(self.intensity_weight_by_contrast, contrast, self.intensity_weight)

    def residual_weight_for(self, contrast: str | None) -> float:
        return by_contrast(self.residual_weight_by_contrast, contrast, self.residual_weight)

    @property
    def depends_on_contrast(self) -> bool:
        return bool(self.sign_by_contrast or self.intensity_weight_by_contrast or self.residual_weight_by_contrast
                    or (self.intensity_floor and (self.intensity_weight or self.intensity_weight_by_contrast)))


SIGNS = ("abs", "positive", "negative")
NORMALISE = ("none", "robust", "robust-signed")


def _per_contrast(name: str, values: dict[str, Any] | None) -> dict[str, Any]:
    values = dict(values or {})
    for key in values:
        if key not in (*SCAN_CONTRASTS, "unknown"):
            raise ValueError(f"{name}: unknown contrast {key!r}; use {', '.join(SCAN_CONTRASTS)} or unknown")
    return values


@dataclass(frozen=True)
class ScanContext:
    """What a map needs to know about its whole scan: the contrast it is scored as, and the intensity
    below which brightness does not count (the brain percentile that ``intensity_floor`` names)."""

    contrast: str | None = None
    floor: float = 0.0


class AutoencoderSliceModel(SliceModel):
    """A 1- or 3-channel ``AutoencoderKL`` working in [-1, 1] (grey repeated to RGB and averaged back)."""

    def __init__(self, vae: AutoencoderKL, *, name: str, weights_hash: str, input_spec: InputSpec,
                 restoration: LatentDiffusionHealer | ImageDenoiser | None = None, map_config: MapConfig | None = None,
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
        if isinstance(self.restoration, ImageDenoiser):  # frozen per contrast, channels-last, in bf16 if asked
            self.restoration.unet.to(memory_format=torch.channels_last)
            self.restoration.for_scoring(torch.bfloat16 if self.precision == "bf16" else torch.float32)

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
        return self.map_config.depends_on_contrast or bool(self.restoration is not None and self.restoration.config.classes)

    def volume_context(self, prepared: PreparedVolume) -> ScanContext:
        """The scan's contrast and intensity floor (its brain's percentile that the map config names)."""
        contrast = prepared.contrast
        percentile = self.map_config.floor_percentile(contrast)
        floor = 0.0
        if self.map_config.weight_for(contrast) and percentile > 0:
            values = prepared.image[prepared.mask]
            floor = float(np.percentile(values, percentile)) if values.size else 0.0
        return ScanContext(contrast=contrast, floor=floor)

    def _reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior-mode latent of a batch and its decode in [0, 1]."""
        z = self.vae.encode(self._to_model(x)).latent_dist.mode()
        return z, self._from_model(self.vae.decode(z).sample)

    @torch.inference_mode()
    def score_slices(self, x: torch.Tensor, generator: torch.Generator | None = None,
                     context: Any = None, mask: torch.Tensor | None = None) -> SliceOutput:
        ctx = context if isinstance(context, ScanContext) else ScanContext(floor=float(context or 0.0))
        cfg = self.map_config
        weight = cfg.weight_for(ctx.contrast)
        sign = cfg.sign_for(ctx.contrast)
        above = (x - ctx.floor).clamp_min(0)  # x >= 0, so a floor of 0 keeps all of it
        x = x.clamp(0, 1)
        with self._autocast():
            if self.restoration is None:
                recon = self._reconstruct(x)[1]
                difference = x - recon
                shown = recon
            elif isinstance(self.restoration, ImageDenoiser):
                # image-space restoration: the VAE only runs when the map compares against its reconstruction
                reference = x if cfg.reference == "input" else self._reconstruct(x)[1]
                brain = mask.to(self.device) if mask is not None else None
                shown = self.restoration.restore(reference.to(self.device), contrast=ctx.contrast,
                                                 mask=brain).float().cpu()
                difference = reference - shown
            else:
                z, recon = self._reconstruct(x)
                draws = max(1, int(self.restoration.config.draws))
                reference = x if cfg.reference == "input" else recon
                residual = torch.zeros_like(x)
                difference = torch.zeros_like(x)
                shown = torch.zeros_like(x)
                for _ in range(draws):
                    zh = self.restoration.heal(z.float(), generator=generator, contrast=ctx.contrast).to(z.dtype)
                    decoded = self._from_model(self.vae.decode(zh).sample)
                    shown += decoded / draws
                    difference += (reference - decoded) / draws
                    residual += _signed(reference - decoded, sign) / draws
        if self.restoration is None or isinstance(self.restoration, ImageDenoiser):
            residual = _signed(difference, sign)
        combined = cfg.residual_weight_for(ctx.contrast) * residual + weight * above
        if cfg.normalise != "none":  # the whole-scan combination reads the term its normalisation needs
            term = {"difference": difference} if cfg.normalise == "robust-signed" else {"residual": residual}
            return SliceOutput(anomaly=combined, reconstruction=shown, parts={**term, "intensity": above})
        return SliceOutput(anomaly=combined, reconstruction=shown)

    def combine_parts(self, parts: dict[str, np.ndarray], prepared: PreparedVolume, context: Any = None) -> np.ndarray:
        """The residual, centred and divided by its spread over the scan's brain, times its weight, plus the
        weighted intensity term (already on the scan's own scale), over the whole scan; with
        ``robust-signed`` the signed difference is z-scored before its sign rule, and the intensity too."""
        ctx = context if isinstance(context, ScanContext) else ScanContext()
        cfg = self.map_config
        weight = cfg.weight_for(ctx.contrast)
        if cfg.normalise == "robust-signed":
            z = robust_z(parts["difference"], prepared.mask)
            out = cfg.residual_weight_for(ctx.contrast) * _signed(z, cfg.sign_for(ctx.contrast))
            if weight:  # brightness above a floor keeps its zero and takes the spread of the whole image
                scale_of = prepared.image if ctx.floor > 0 else None
                out = out + weight * robust_z(parts["intensity"], prepared.mask, scale_of=scale_of)
            return np.clip(out, 0, None).astype(np.float32)
        out = cfg.residual_weight_for(ctx.contrast) * robust_z(parts["residual"], prepared.mask)
        if weight and "intensity" in parts:
            out = out + weight * parts["intensity"]
        return np.clip(out, 0, None).astype(np.float32)

    def identity(self) -> ModelIdentity:
        config: dict[str, Any] = {
            "vae": dict(self.vae.config), "input_spec": asdict(self.input_spec),
            "map": asdict(self.map_config), "precision": self.precision, **self.extra,
        }
        if self.restoration is not None:
            config["restoration"] = asdict(self.restoration.config)
        return ModelIdentity(name=self.name, weights_hash=self.weights_hash, config=_jsonable(config))


def _signed(diff: T, sign: str) -> T:
    """The part of a difference (tensor or array) that the sign rule keeps: abs, positive or negative."""
    if sign == "positive":
        return diff.clip(min=0)
    if sign == "negative":
        return (-diff).clip(min=0)
    return abs(diff)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)

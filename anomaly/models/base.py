"""The slice-model interface every reconstructor implements, and its output dataclass."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from anomaly.preprocess import InputSpec, PreparedVolume


@dataclass
class SliceOutput:
    """Per-slice anomaly maps (non-negative, intensity units of the [0, 1] input) and, for
    reconstruction models, the (restored) reconstruction shown beside the input. A model whose map
    needs whole-scan statistics also returns its terms in ``parts``; scoring gathers them over the
    scan and hands them to :meth:`SliceModel.combine_parts`."""

    anomaly: torch.Tensor
    reconstruction: torch.Tensor | None = None
    parts: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class ModelIdentity:
    """What the store records about a model: its name, a hash of its weights and its config."""

    name: str
    weights_hash: str
    config: dict[str, Any] = field(default_factory=dict)


class SliceModel(ABC):
    """Turns a batch of axial slices ``[B, 1, H, W]`` (1 = upper brain percentile, zero outside the brain;
    values may exceed 1 for very bright tissue, reconstruction models clamp to [0, 1]) into maps."""

    name: str = "model"
    input_spec: InputSpec = InputSpec()
    median_size: int | tuple[int, ...] = 5
    """In-plane median filter (pixels of its grid; several sizes: the mean of their medians) its maps were
    chosen with; the settings' own wins when set."""
    through_plane_mm: float = 0.0
    """Gaussian smoothing of its maps across slices (sigma, mm; 0 = off); the settings' own wins when set."""

    @abstractmethod
    def score_slices(self, x: torch.Tensor, generator: torch.Generator | None = None,
                     context: Any = None, mask: torch.Tensor | None = None) -> SliceOutput:
        """Anomaly maps for one batch of slices; ``context`` is what :meth:`volume_context` gave for their scan,
        ``mask`` their brain mask (> 0.5 is brain; without it, non-zero pixels are the brain)."""

    @property
    def uses_contrast(self) -> bool:
        """Whether this model's map depends on the scan's contrast (then an unknown contrast is worth a warning)."""
        return False

    def volume_context(self, prepared: PreparedVolume) -> Any:
        """Per-scan values a map needs beyond its slices (e.g. a brain intensity percentile); None by default."""
        return None

    def combine_parts(self, parts: dict[str, np.ndarray], prepared: PreparedVolume, context: Any = None) -> np.ndarray:
        """The scan's map from its terms gathered over every slice (only for models that return ``parts``)."""
        raise NotImplementedError(f"{type(self).__name__} returns map parts but does not combine them")

    @abstractmethod
    def identity(self) -> ModelIdentity:
        """Name, weights hash and config, so results say exactly which model made them."""

    def to(self, device: str | torch.device) -> SliceModel:
        return self

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

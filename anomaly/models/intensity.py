"""The non-learned baseline: the normalised intensity itself is the anomaly map."""

from __future__ import annotations

from typing import Any

import torch

from anomaly.models.base import ModelIdentity, SliceModel, SliceOutput
from anomaly.preprocess import InputSpec


class IntensityBaseline(SliceModel):
    """Bright is abnormal: a strong baseline for FLAIR/T2 hyperintensities that any model must beat."""

    name = "intensity"

    def __init__(self, input_spec: InputSpec | None = None) -> None:
        self.input_spec = input_spec or InputSpec(slice_size=192, spacing=(1.0, 1.0, 1.0))

    def score_slices(self, x: torch.Tensor, generator: torch.Generator | None = None,
                     context: Any = None, mask: torch.Tensor | None = None) -> SliceOutput:
        return SliceOutput(anomaly=x.clone(), reconstruction=None)

    def identity(self) -> ModelIdentity:
        return ModelIdentity(name=self.name, weights_hash="none", config={"kind": "intensity"})

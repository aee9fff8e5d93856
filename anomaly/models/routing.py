"""One model per contrast behind one name: a model folder may hold, per contrast, a further model folder
(its own grid, restoration stage and map rule) that scans of that contrast are scored with.

A scan's route is chosen from the contrast it is scored as (the setting, its source or its file name) before
it is resampled, because each route has its own input grid. Scans of other or unknown contrast use the
folder's own model. The store records the folder as one model (its weights hash covers every route), and
each result says which route scored it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from anomaly.contrast import contrast_key
from anomaly.models.base import ModelIdentity, SliceModel, SliceOutput
from anomaly.preprocess import PreparedVolume


class ContrastRoutedModel(SliceModel):
    """``base`` for every contrast except those in ``routes`` (contrast -> model)."""

    def __init__(self, base: SliceModel, routes: dict[str, SliceModel], *, weights_hash: str) -> None:
        self.base = base
        self.routes = dict(routes)
        self.name = base.name
        self.input_spec = base.input_spec
        self.median_size = base.median_size
        self.through_plane_mm = base.through_plane_mm
        self.weights_hash = weights_hash

    def for_contrast(self, contrast: str | None) -> SliceModel:
        """The model that scores a scan of this contrast (a t1c scan: the T1 route, where there is one)."""
        key = contrast_key(self.routes, contrast)
        return self.base if key is None else self.routes[key]

    @property
    def uses_contrast(self) -> bool:
        return True

    def score_slices(self, x: torch.Tensor, generator: torch.Generator | None = None,
                     context: Any = None, mask: torch.Tensor | None = None) -> SliceOutput:
        return self.base.score_slices(x, generator, context, mask)

    def volume_context(self, prepared: PreparedVolume) -> Any:
        return self.base.volume_context(prepared)

    def combine_parts(self, parts: dict[str, np.ndarray], prepared: PreparedVolume, context: Any = None) -> np.ndarray:
        return self.base.combine_parts(parts, prepared, context)

    def identity(self) -> ModelIdentity:
        own = self.base.identity()
        routes = {contrast: {"name": model.name, **model.identity().config}
                  for contrast, model in sorted(self.routes.items())}
        return ModelIdentity(name=own.name, weights_hash=self.weights_hash, config={**own.config, "by_contrast": routes})

    def to(self, device: str | torch.device) -> ContrastRoutedModel:
        self.base.to(device)
        for model in self.routes.values():
            model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.base.device


def model_for(model: SliceModel, contrast: str | None) -> SliceModel:
    """The model that scores a scan of ``contrast``: its route where ``model`` routes by contrast, else itself."""
    return model.for_contrast(contrast) if isinstance(model, ContrastRoutedModel) else model


def route_note(model: SliceModel, contrast: str | None) -> str | None:
    """What a result records about its route: ``"t2: <model name>"`` where a route scored it, else None."""
    if not isinstance(model, ContrastRoutedModel):
        return None
    key = contrast_key(model.routes, contrast)
    return None if key is None else f"{key}: {model.routes[key].name}"

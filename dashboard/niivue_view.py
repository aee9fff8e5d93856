"""The interactive multiplanar/3D view: the vendored NiiVue bundle served as Streamlit component files
(no CDN, no network) and fed compact NIfTI volumes inline as base64."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import streamlit as st
import streamlit.components.v1 as components

from anomaly import gzipio
from anomaly.viz import CanonicalVolume

NIIVUE_DIR = Path(__file__).resolve().with_name("niivue")
"""Folder with ``index.html``, the vendored ``niivue.umd.js`` and its NOTICE."""

MAX_VOXELS = 12_000_000
"""Volumes above this many voxels are sent at half resolution (the 2D viewer keeps full resolution)."""

LAYOUTS: tuple[str, ...] = ("multiplanar", "render", "axial", "coronal", "sagittal")

_component = components.declare_component("anomaly_niivue", path=str(NIIVUE_DIR))


@dataclass(frozen=True)
class NiivueVolume:
    """One layer of the view: a gzip NIfTI as base64 with its colour map and display range."""

    name: str
    base64: str
    colormap: str
    cal_min: float
    cal_max: float
    opacity: float = 1.0
    source: str = ""
    """What the layer was built from (path, mtime, size, range): identifies its content."""

    def args(self) -> dict[str, Any]:
        """The layer as sent to the browser component."""
        return {
            "name": self.name,
            "base64": self.base64,
            "colormap": self.colormap,
            "cal_min": self.cal_min,
            "cal_max": self.cal_max,
            "opacity": self.opacity,
        }


def encode_nifti(volume: CanonicalVolume, low: float, high: float) -> str:
    """A volume quantised to uint8 between ``low`` and ``high`` (scale slope keeps the real values),
    halved in resolution when very large, as base64 of a gzip NIfTI."""
    data, affine = volume.data, np.array(volume.affine, dtype=np.float64)
    if data.size > MAX_VOXELS:
        data = data[::2, ::2, ::2]
        affine[:3, :3] *= 2.0
    span = max(float(high) - float(low), 1e-12)
    scaled = (np.nan_to_num(np.asarray(data, dtype=np.float32), nan=float(low)) - float(low)) * (255.0 / span)
    quantised = np.clip(scaled + 0.5, 0, 255).astype(np.uint8)
    image = nib.Nifti1Image(quantised, affine)
    image.header.set_slope_inter(span / 255.0, float(low))
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return base64.b64encode(gzipio.compress(image.to_bytes())).decode("ascii")


@st.cache_data(max_entries=12, show_spinner="Preparing the 3D view…")
def _encoded(cache_key: str, _volume: CanonicalVolume, low: float, high: float) -> str:
    return encode_nifti(_volume, low, high)


def layer(
    cache_key: str,
    name: str,
    volume: CanonicalVolume,
    *,
    low: float,
    high: float,
    colormap: str,
    cal_min: float | None = None,
    cal_max: float | None = None,
    opacity: float = 1.0,
) -> NiivueVolume:
    """A layer whose encoding is cached under ``cache_key`` (path, mtime and size of its file)."""
    encoded = _encoded(f"{cache_key}|{low:.6g}|{high:.6g}", volume, float(low), float(high))
    return NiivueVolume(
        name,
        encoded,
        colormap,
        float(low if cal_min is None else cal_min),
        float(high if cal_max is None else cal_max),
        float(opacity),
        source=f"{cache_key}|{low:.6g}|{high:.6g}",
    )


def niivue_view(
    layers: list[NiivueVolume],
    *,
    crosshair_mm: tuple[float, float, float] | None = None,
    layout: str = "multiplanar",
    height: int = 520,
    key: str = "niivue",
) -> None:
    """Draw the NiiVue view; the browser reloads the volumes only when their content changes (the token),
    otherwise it just updates display ranges, opacity, colour maps, layout and crosshair."""
    token = hashlib.sha1("\n".join(f"{v.name}|{v.source}" for v in layers).encode()).hexdigest()
    _component(
        volumes=[v.args() for v in layers],
        token=token,
        layout=layout if layout in LAYOUTS else LAYOUTS[0],
        crosshair_mm=None if crosshair_mm is None else [float(c) for c in crosshair_mm],
        height=int(height),
        key=key,
        default=None,
    )

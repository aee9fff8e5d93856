"""Names of the files a scoring run writes for each scan, shared by pipelines, dashboard and reports.

``<stem>_anomaly.nii.gz`` the map; ``<stem>_brain.nii.gz`` the scored brain mask (calibration and
evaluation count voxels inside it); ``<stem>_recon.nii.gz`` the (restored) reconstruction;
``<stem>_mask.nii.gz`` the calibrated findings mask.
"""

from __future__ import annotations

import os
from pathlib import Path

KINDS = ("anomaly", "brain", "recon", "mask")


def output_path(out_dir: str | os.PathLike[str], stem: str, kind: str) -> Path:
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}; one of {', '.join(KINDS)}")
    return Path(out_dir) / f"{stem}_{kind}.nii.gz"


def sibling(map_path: str | os.PathLike[str], kind: str) -> Path:
    """Another output of the same scan, from the path of its map (``x_anomaly`` -> ``x_brain``)."""
    path = Path(map_path)
    if "_anomaly.nii" not in path.name:
        from anomaly.io.bids import sibling_name

        bids = sibling_name(path, kind)  # a BIDS derivative map (..._desc-anomaly_T1w.nii.gz)
        if bids is not None:
            return bids
        raise ValueError(f"{path}: not an anomaly map name (<stem>_anomaly.nii.gz)")
    return path.with_name(path.name.replace("_anomaly.nii", f"_{kind}.nii"))

"""Names of the files a scoring run writes for each scan, shared by pipelines, dashboard and reports.

``<stem>_anomaly.nii.gz`` the map; ``<stem>_brain.nii.gz`` the scored brain mask (calibration and
evaluation count voxels inside it); ``<stem>_recon.nii.gz`` the (restored) reconstruction;
``<stem>_mask.nii.gz`` the calibrated findings mask.

``<stem>`` is the scan's file name without ``.nii``/``.nii.gz`` whenever that name is free in the output
folder; when another scan (or another run) already holds it, a short suffix from the scan's content hash
is added (``flair_3fa2b1c0``), and names too long for the file system are shortened the same way. The
store records which (run, scan) holds each name, so a file is never written by two scans.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from itertools import count
from pathlib import Path

from anomaly.fileio import NAME_MAX

KINDS: tuple[str, ...] = ("anomaly", "brain", "recon", "mask")
"""The outputs of a scan, by the word every layer uses for them (file suffix, dashboard, reports)."""
RESULT_ATTRIBUTES: dict[str, str] = {"anomaly": "map_path", "recon": "recon_path", "mask": "mask_path"}
"""Where a stored result records the path of each output (the brain mask lies beside the map: :func:`sibling`)."""
_LONGEST_SUFFIX = "_anomaly.nii.gz"
MAX_STEM_BYTES = NAME_MAX - len(_LONGEST_SUFFIX)
"""Longest stem (UTF-8 bytes) whose every output name fits in one file-name component."""


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


def output_key(out_dir: str | os.PathLike[str], stem: str) -> str:
    """The unique key of a stem in a folder (case-folded: ``Flair`` and ``flair`` are one file on
    case-insensitive file systems)."""
    return hashlib.sha256(f"{os.fspath(out_dir)}\0{stem.casefold()}".encode("utf-8", "surrogatepass")).hexdigest()


def _clip(text: str, limit: int) -> str:
    raw = text.encode("utf-8", "surrogateescape")
    return text if len(raw) <= limit else raw[:limit].decode("utf-8", "ignore")


def stem_candidates(preferred: str, content_hash: str, run_id: int) -> Iterator[str]:
    """Stems to try in order: the preferred one (when it fits), then with the content hash's first 8
    characters, then also with the run id, then numbered; each fits ``MAX_STEM_BYTES``."""
    preferred = preferred.lstrip(".") or "scan"
    short = content_hash[:8] or "x"
    if len(preferred.encode("utf-8", "surrogateescape")) <= MAX_STEM_BYTES:
        yield preferred
    tags = (f"_{short}", f"_{short}-r{run_id}")
    for tag in tags:
        yield _clip(preferred, MAX_STEM_BYTES - len(tag)) + tag
    for n in count(2):
        tag = f"_{short}-r{run_id}-{n}"
        yield _clip(preferred, MAX_STEM_BYTES - len(tag)) + tag


def outputs_present(out_dir: str | os.PathLike[str], stem: str) -> bool:
    """True when any output file of ``stem`` already exists in ``out_dir`` (even as a broken link)."""
    return any(os.path.lexists(output_path(out_dir, stem, kind)) for kind in KINDS)

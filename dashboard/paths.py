"""Which files the dashboard may open: only paths recorded in the database for a result, and only when
they stay inside the run's output folder (maps, reconstructions, masks) or are the very input or
label file recorded for that result. Nothing a user types ever becomes a path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from anomaly.outputs import KINDS, RESULT_ATTRIBUTES, sibling
from anomaly.records import ResultDetails
from anomaly.volume import is_nifti_path

OUTPUT_KINDS: tuple[str, ...] = KINDS
"""Files a scoring run writes into its output folder (the names of :mod:`anomaly.outputs`)."""

RECORDED_KINDS: tuple[str, ...] = ("input", "label")
"""Files the user gave to the pipeline, opened only at the exact path recorded for the result; a label is a
voxel mask (lesion = non-zero) on the input's grid, recorded as ``ResultDetails.label_path``."""

_ATTRIBUTE = {**RESULT_ATTRIBUTES, "input": "input_path"}


class UnsafePathError(ValueError):
    """A recorded path that the dashboard refuses to open, with the reason."""


def inside(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Whether ``path``, with every symbolic link and ``..`` resolved, lies strictly inside ``folder``."""
    real = Path(os.path.realpath(path))
    root = Path(os.path.realpath(folder))
    return real != root and real.is_relative_to(root)


def check_output_path(recorded: str, out_dir: str, kind: str = "anomaly") -> Path:
    """The real path of an output file recorded for a result; refuses anything outside ``out_dir``."""
    if not out_dir:
        raise UnsafePathError(
            f"{kind} file {recorded!r}: the run has no output folder recorded, so nothing is opened"
        )
    if not is_nifti_path(recorded):
        raise UnsafePathError(
            f"{kind} file {recorded!r} is not a .nii/.nii.gz file; the dashboard opens NIfTI files only"
        )
    candidate = Path(recorded)
    if not candidate.is_absolute():
        candidate = Path(out_dir) / candidate
    if not inside(candidate, out_dir):
        raise UnsafePathError(
            f"{kind} file {recorded!r} resolves to {os.path.realpath(candidate)}, outside the run's output "
            f"folder {out_dir}; the dashboard opens only files inside it (move the outputs back or score again)"
        )
    return Path(os.path.realpath(candidate))


def check_recorded_path(requested: str, recorded: str | None, kind: str = "input") -> Path:
    """``requested`` as a path when it is exactly the path recorded for the result (and a NIfTI name)."""
    if not recorded or os.fspath(requested) != recorded:
        raise UnsafePathError(
            f"{kind} file {requested!r} is not the {kind} recorded for this result ({recorded!r}); "
            "the dashboard opens only recorded files"
        )
    if not is_nifti_path(recorded):
        raise UnsafePathError(
            f"{kind} file {recorded!r} is not a .nii/.nii.gz file; the dashboard opens NIfTI files only"
        )
    return Path(recorded)


def recorded_path(result: Any, kind: str) -> str | None:
    """The path stored for ``kind`` on a result row (ORM ``Result`` or ``ResultRow``), or None."""
    if kind == "label":
        return ResultDetails.from_dict(getattr(result, "details", None)).label_path or None
    if kind == "brain":  # the brain mask scoring used, written beside the map
        map_path = getattr(result, "map_path", None)
        try:
            return str(sibling(map_path, "brain")) if map_path else None
        except ValueError:
            return None
    if kind not in _ATTRIBUTE:
        raise ValueError(f"unknown file kind {kind!r}; use one of {OUTPUT_KINDS + RECORDED_KINDS}")
    value = getattr(result, _ATTRIBUTE[kind], None)
    return str(value) if value else None


def result_file(result: Any, out_dir: str, kind: str) -> Path | None:
    """The checked path of a result's ``kind`` file (None when none is recorded).

    Raises :class:`UnsafePathError` when the recorded path may not be opened; the file itself may
    still be missing (check ``exists()``).
    """
    recorded = recorded_path(result, kind)
    if recorded is None:
        return None
    if kind in OUTPUT_KINDS:
        return check_output_path(recorded, out_dir, kind)
    return check_recorded_path(recorded, recorded, kind)


def display_path(path: str | os.PathLike[str] | None, out_dir: str) -> str:
    """A short form for display: relative to the run's output folder when inside it."""
    if not path:
        return ""
    p = Path(path)
    try:
        return str(p.relative_to(out_dir))
    except ValueError:
        return str(p)

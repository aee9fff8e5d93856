"""MRI contrast of a scan (T1, T2, FLAIR): named by the user or read from common file-naming conventions.

The contrast decides how an intensity term enters a map: on T2 and FLAIR most lesions are brighter than
normal tissue, on T1 they are not (white matter is the brightest normal tissue there).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

CONTRASTS: tuple[str, ...] = ("t1", "t2", "flair")
SETTINGS: tuple[str, ...] = ("auto", *CONTRASTS)

# Name tokens, checked in this order (FLAIR first: "t2_flair" is a FLAIR).
_TOKENS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("flair", re.compile(r"flair")),
    ("t1", re.compile(r"(?<![a-z0-9])(t1|t1w|t1c|t1ce|t1gd|t1post|mprage|spgr|ch2|ch2bet|ch2better|colin27?)(?![a-z0-9])")),
    ("t2", re.compile(r"(?<![a-z0-9])(t2|t2w|tse)(?![a-z0-9])")),
)


def guess_contrast(path: str | os.PathLike[str]) -> str | None:
    """The contrast a file name states (BIDS suffixes ``_T1w``/``_T2w``/``_FLAIR``, tokens such as
    ``t1``, ``t1c``, ``t2``, ``flair``, ``mprage``, the Colin27 ``ch2`` files), or None when it says none."""
    name = Path(path).name.lower()
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    for contrast, pattern in _TOKENS:
        if pattern.search(name):
            return contrast
    return None


def check_contrast_setting(value: str) -> str:
    """A valid ``contrast`` setting, lower-cased, or a ValueError that lists the choices."""
    normal = str(value).strip().lower()
    if normal not in SETTINGS:
        raise ValueError(f"contrast must be one of {', '.join(SETTINGS)}, not {value!r}")
    return normal


def resolve_contrast(setting: str, path: str | os.PathLike[str] | None) -> str | None:
    """The contrast one scan is scored as: the setting itself, or with ``auto`` the file name's."""
    setting = check_contrast_setting(setting)
    if setting != "auto":
        return setting
    return guess_contrast(path) if path is not None else None

"""MRI contrast of a scan (T1, contrast-enhanced T1, T2, FLAIR): named by the user or read from common
file-naming conventions.

The contrast decides how an intensity term enters a map: on T2 and FLAIR most lesions are brighter than
normal tissue, on T1 they are not (white matter is the brightest normal tissue there). A contrast-enhanced
T1 (``t1c``, after gadolinium) is scored by the T1 network, but enhancing tumour is brighter than any
normal tissue there, so a map rule may treat it apart from a native T1.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

CONTRASTS: tuple[str, ...] = ("t1", "t2", "flair")
"""The contrasts networks are trained on and models route by."""
FAMILY: dict[str, str] = {"t1c": "t1"}
"""Scan contrasts scored by the network of another: a contrast-enhanced T1 by the T1 network."""
SCAN_CONTRASTS: tuple[str, ...] = ("t1", "t1c", "t2", "flair")
"""Every contrast a scan may be scored as (map rules may be set for each)."""
SETTINGS: tuple[str, ...] = ("auto", *SCAN_CONTRASTS)
LABELS: dict[str, str] = {"t1": "T1", "t1c": "T1c", "t2": "T2", "flair": "FLAIR"}
"""How each contrast is written for readers (T1c: contrast-enhanced T1)."""

# Name tokens, checked in this order (FLAIR first: "t2_flair" is a FLAIR).
_TOKENS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("flair", re.compile(r"flair")),
    ("t1c", re.compile(r"(?<![a-z0-9])(t1c|t1ce|t1gd|t1post|t1 ?\+ ?c)(?![a-z0-9])")),
    ("t1", re.compile(r"(?<![a-z0-9])(t1|t1w|mprage|spgr|ch2|ch2bet|ch2better|colin27?)(?![a-z0-9])")),
    ("t2", re.compile(r"(?<![a-z0-9])(t2|t2w|tse)(?![a-z0-9])")),
)

# A contrast agent named beside a T1 token: BIDS ``ce-<agent>`` entities, "gd", "post contrast", "+C" ...
_AGENT = re.compile(r"(?<![a-z0-9])(ce-[a-z0-9]+|ce|gd|gad|gado|gadolinium|postcontrast|post ?gd|post ?gad|"
                    r"post ?contrast|contrast ?enhanced)(?![a-z0-9])|\+ ?c(?![a-z0-9])")


def network_contrast(contrast: str | None) -> str | None:
    """The contrast whose network and route score a scan of ``contrast`` (``t1c`` -> ``t1``)."""
    return FAMILY.get(contrast, contrast) if contrast else contrast


def contrast_key(values: Mapping[str, object], contrast: str | None) -> str | None:
    """The key of a per-contrast mapping that holds for a scan of ``contrast``: its own, else its network
    contrast's (``t1c`` -> ``t1``); ``unknown`` for no contrast; None where neither is there."""
    for key in (contrast or "unknown", network_contrast(contrast) or "unknown"):
        if key in values:
            return key
    return None


def by_contrast(values: Mapping[str, T], contrast: str | None, default: T) -> T:
    """A per-contrast setting for a scan of ``contrast`` (see :func:`contrast_key`), else ``default``."""
    key = contrast_key(values, contrast)
    return default if key is None else values[key]


def class_index(classes: tuple[str, ...], contrast: str | None) -> int:
    """The class of a contrast-conditional network for a scan of ``contrast`` (a t1c scan: the T1 class);
    the "unknown" class (last) for one the network was not trained on."""
    contrast = network_contrast(contrast)
    return classes.index(contrast) if contrast in classes else len(classes)


def contrast_label(contrast: str) -> str:
    """The contrast as readers write it: ``t1c`` -> ``T1c``, ``flair`` -> ``FLAIR``."""
    return LABELS.get(contrast, contrast.upper())


def _enhanced(contrast: str | None, text: str) -> str | None:
    """``t1c`` where a T1 guess comes with a contrast agent named in the same (lower-case) text, else the
    guess; underscores and dots separate words there, as spaces do."""
    return "t1c" if contrast == "t1" and _AGENT.search(re.sub(r"[_.\s]+", " ", text)) else contrast


def guess_contrast(path: str | os.PathLike[str]) -> str | None:
    """The contrast a file name states (BIDS suffixes ``_T1w``/``_T2w``/``_FLAIR``, tokens such as
    ``t1``, ``t1c``, ``t2``, ``flair``, ``mprage``, the Colin27 ``ch2`` files), or None when it says none.
    A T1 whose name also names a contrast agent (``t1ce``, ``_ce-gadolinium_T1w``, ``t1_gd``) is ``t1c``."""
    name = Path(path).name.lower()
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    for contrast, pattern in _TOKENS:
        if pattern.search(name):
            return _enhanced(contrast, name)
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


def contrast_from_text(*texts: str | None) -> str | None:
    """The contrast named in free text such as a DICOM series description, protocol or sequence name."""
    raw = " ".join(t for t in texts if t).lower().replace("*", " ")
    joined = re.sub(r"[^a-z0-9]+", " ", raw)
    extra_t1 = re.compile(r"(?<![a-z0-9])(tfl3d\w*|fl3d\w*|bravo|tfe|ffe3d|3d t1|t1 mpr|mp rage)(?![a-z0-9])")
    for contrast, pattern in _TOKENS:
        if pattern.search(joined):
            return _enhanced(contrast, raw)
    if "dark fluid" in joined or re.search(r"(?<![a-z0-9])tirm(?![a-z0-9])", joined):
        return "flair"
    if extra_t1.search(joined):
        return _enhanced("t1", raw)
    return None


def contrast_from_timing(tr_ms: float | None, te_ms: float | None, ti_ms: float | None) -> str | None:
    """The contrast implied by repetition, echo and inversion times (ms), or None when they do not say.

    Long inversion with a long echo nulls fluid (FLAIR); a short echo with a moderate inversion
    (MPRAGE) or with a short repetition is T1-weighted; a long repetition with a long echo is T2.
    """
    if te_ms is None:
        return None
    if ti_ms is not None and ti_ms >= 1500 and te_ms >= 50:
        return "flair"
    if ti_ms is not None and 300 <= ti_ms <= 1400 and te_ms <= 15:
        return "t1"
    if tr_ms is not None and tr_ms <= 1000 and te_ms <= 30:
        return "t1"
    if tr_ms is not None and tr_ms >= 2000 and te_ms >= 60:
        return "t2"
    return None


def contrast_from_metadata(texts: tuple[str | None, ...], tr_ms: float | None = None, te_ms: float | None = None,
                           ti_ms: float | None = None) -> tuple[str | None, str]:
    """The contrast of a series from its description/sequence names, else its timing; with the reason."""
    by_text = contrast_from_text(*texts)
    named = ", ".join(repr(t) for t in texts if t)
    if by_text is not None:
        return by_text, f"named in {named}"
    by_timing = contrast_from_timing(tr_ms, te_ms, ti_ms)
    timing = ", ".join(f"{k} {v:g} ms" for k, v in (("TR", tr_ms), ("TE", te_ms), ("TI", ti_ms)) if v is not None)
    if by_timing is not None:
        return by_timing, f"from {timing}"
    return None, f"neither the names ({named or 'none'}) nor the timing ({timing or 'none'}) say"

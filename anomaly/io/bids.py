"""BIDS datasets in (anatomical images read with pybids) and BIDS derivatives out.

Derivative names keep the source entities and add ``desc-``: for ``sub-01_ses-1_FLAIR.nii.gz``
the anomaly map is ``sub-01_ses-1_desc-anomaly_FLAIR.nii.gz``, the reconstruction
``..._desc-recon_FLAIR.nii.gz``, and the masks ``..._desc-brainFLAIR_mask.nii.gz`` (scored brain) and
``..._desc-anomalyFLAIR_mask.nii.gz`` (calibrated findings): the source suffix stays in the mask's
``desc`` so the masks of a T1w and a FLAIR of one session never share a name. ``derivative_problems``
checks an output folder against the BIDS schema's derivative file rules (bidsschematools).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomaly.contrast import contrast_from_timing

SUFFIX_CONTRAST: dict[str, str | None] = {
    "T1w": "t1", "inplaneT1": "t1", "T2w": "t2", "inplaneT2": "t2", "FLAIR": "flair", "PDw": None, "T2starw": None,
}
"""Anatomical suffixes that are scored, with the contrast each states (None: read from the sidecar timing)."""

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
DESCRIPTIONS = {"anomaly": "anomaly", "recon": "recon"}
BIDS_VERSION = "1.10.0"


class BidsError(ValueError):
    """A BIDS dataset or selection that cannot be used, with what to do."""


# ---------------------------------------------------------------------------------------------- names


def split_name(name: str) -> tuple[str, str, str]:
    """``sub-01_ses-1_T1w.nii.gz`` -> (``sub-01_ses-1``, ``T1w``, ``.nii.gz``)."""
    for ext in (*NIFTI_EXTENSIONS, ".json"):
        if name.endswith(ext):
            stem = name[: -len(ext)]
            break
    else:
        raise ValueError(f"{name}: not a BIDS NIfTI or JSON name")
    prefix, _, suffix = stem.rpartition("_")
    if not prefix or not suffix:
        raise ValueError(f"{name}: no BIDS suffix (expected <entities>_<suffix>{ext})")
    return prefix, suffix, ext


def derivative_names(source_relpath: str) -> dict[str, str]:
    """Output names (relative to the derivatives root) of every kind, for a source image's relative path."""
    folder, name = os.path.split(source_relpath)
    prefix, suffix, _ = split_name(name)
    prefix = re.sub(r"_desc-[A-Za-z0-9]+", "", prefix)
    names = {
        "anomaly": f"{prefix}_desc-anomaly_{suffix}.nii.gz",
        "recon": f"{prefix}_desc-recon_{suffix}.nii.gz",
        "brain": f"{prefix}_desc-brain{suffix}_mask.nii.gz",
        "mask": f"{prefix}_desc-anomaly{suffix}_mask.nii.gz",
    }
    return {kind: os.path.join(folder, value) for kind, value in names.items()}


def sibling_name(map_path: str | os.PathLike[str], kind: str) -> Path | None:
    """Another output of the image whose anomaly map is ``map_path`` (BIDS names), or None when the
    name is not a BIDS anomaly map."""
    path = Path(map_path)
    match = re.fullmatch(r"(?P<prefix>.+)_desc-anomaly_(?P<suffix>[A-Za-z0-9]+)\.nii(\.gz)?", path.name)
    if match is None:
        return None
    prefix, suffix = match["prefix"], match["suffix"]
    names = {"anomaly": f"{prefix}_desc-anomaly_{suffix}.nii.gz", "recon": f"{prefix}_desc-recon_{suffix}.nii.gz",
             "brain": f"{prefix}_desc-brain{suffix}_mask.nii.gz", "mask": f"{prefix}_desc-anomaly{suffix}_mask.nii.gz"}
    if kind not in names:
        raise ValueError(f"unknown output kind {kind!r}; one of {', '.join(names)}")
    return path.with_name(names[kind])


def sidecar_path(image_path: str | os.PathLike[str]) -> Path:
    """``x.nii.gz`` -> ``x.json``."""
    path = Path(image_path)
    for ext in NIFTI_EXTENSIONS:
        if path.name.endswith(ext):
            return path.with_name(path.name[: -len(ext)] + ".json")
    return path.with_suffix(".json")


# ---------------------------------------------------------------------------------------------- input


@dataclass(frozen=True)
class BidsImage:
    """One anatomical image of a BIDS dataset, its entities, sidecar metadata and stated contrast."""

    path: Path
    relpath: str
    subject: str
    session: str | None
    suffix: str
    entities: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def contrast(self) -> tuple[str | None, str]:
        """The contrast the BIDS suffix states, else what the sidecar's TR/TE/TI imply; with the reason."""
        stated = SUFFIX_CONTRAST.get(self.suffix)
        timing = [_ms(self.metadata.get(k)) for k in ("RepetitionTime", "EchoTime", "InversionTime")]
        if stated == "t1" and self.entities.get("ceagent"):  # ce-<agent>: a contrast-enhanced T1
            return "t1c", f"BIDS suffix {self.suffix} with ce-{self.entities['ceagent']}"
        if stated is not None:
            by_timing = contrast_from_timing(*timing)
            note = f"BIDS suffix {self.suffix}"
            if by_timing is not None and by_timing != stated:
                note += f" (the sidecar's timing suggests {by_timing}; the suffix is used)"
            return stated, note
        by_timing = contrast_from_timing(*timing)
        if by_timing is not None:
            return by_timing, f"sidecar timing of a {self.suffix} image"
        return None, f"BIDS suffix {self.suffix} and its sidecar name no T1/T2/FLAIR contrast"

    def source_facts(self) -> dict[str, Any]:
        """What the result store keeps about this image's source."""
        contrast, note = self.contrast
        keep = ("RepetitionTime", "EchoTime", "InversionTime", "MagneticFieldStrength", "Manufacturer",
                "SeriesDescription", "ProtocolName", "SequenceName", "AcquisitionDateTime")
        meta = {k: self.metadata[k] for k in keep if k in self.metadata}
        date = str(self.metadata.get("AcquisitionDateTime", "") or "")[:10] or None
        return {"source": "bids", "series_description": self.metadata.get("SeriesDescription"),
                "series_uid": self.metadata.get("SeriesInstanceUID"), "study_uid": self.metadata.get("StudyInstanceUID"),
                "acquisition_date": date,
                "source_meta": {"bids_path": self.relpath, "entities": dict(self.entities), "suffix": self.suffix,
                                "sidecar": meta, "contrast": contrast, "contrast_reason": note}}


def _ms(value: Any) -> float | None:
    """BIDS times are in seconds."""
    try:
        return float(value) * 1000.0
    except (TypeError, ValueError):
        return None


def _labels(values: Sequence[str] | None, prefix: str) -> list[str] | None:
    if not values:
        return None
    return [v[len(prefix):] if v.startswith(prefix) else v for v in values]


def find_anatomical(bids_dir: str | os.PathLike[str], participants: Sequence[str] | None = None,
                    sessions: Sequence[str] | None = None, validate: bool = True) -> list[BidsImage]:
    """The scorable anatomical images (``SUFFIX_CONTRAST``) of the chosen subjects and sessions, read
    with pybids (files that are not valid BIDS names are left out when ``validate``)."""
    from bids import BIDSLayout

    root = Path(bids_dir).expanduser().resolve()
    if not (root / "dataset_description.json").is_file():
        raise BidsError(f"{root}: not a BIDS dataset (no dataset_description.json); give the dataset's root folder")
    try:
        layout = BIDSLayout(str(root), validate=validate, derivatives=False)
    except Exception as exc:  # noqa: BLE001 - pybids raises many kinds for a malformed dataset
        raise BidsError(f"{root}: pybids cannot index the dataset ({type(exc).__name__}: {exc})") from exc
    subjects = sorted(layout.get_subjects())
    wanted = _labels(participants, "sub-")
    if wanted:
        missing = sorted(set(wanted) - set(subjects))
        if missing:
            raise BidsError(f"{root}: participant(s) {', '.join(missing)} not found (the dataset has "
                            f"{', '.join(subjects) or 'none'}); check --participant-label")
    query: dict[str, Any] = {"datatype": "anat", "suffix": list(SUFFIX_CONTRAST),
                             "extension": list(NIFTI_EXTENSIONS), "return_type": "object"}
    if wanted:
        query["subject"] = wanted
    chosen_sessions = _labels(sessions, "ses-")
    if chosen_sessions:
        known = set(layout.get_sessions())
        missing = sorted(set(chosen_sessions) - known)
        if missing:
            raise BidsError(f"{root}: session(s) {', '.join(missing)} not found (the dataset has "
                            f"{', '.join(sorted(known)) or 'no sessions'}); check --session-label")
        query["session"] = chosen_sessions
    images = []
    for item in layout.get(**query):
        entities = {k: v for k, v in item.get_entities().items() if k not in ("extension", "datatype")}
        metadata = item.get_metadata() or {}
        relpath = _relative(Path(item.path), root)
        images.append(BidsImage(path=Path(item.path), relpath=relpath, subject=str(entities["subject"]),
                                session=str(entities["session"]) if "session" in entities else None,
                                suffix=str(entities["suffix"]), entities=entities, metadata=dict(metadata)))
    return sorted(images, key=lambda im: im.relpath)


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to the dataset root, by its name in the dataset: an annexed file (datalad,
    git-annex) is a link to a content key, and the key's name is not the image's BIDS name."""
    try:
        return Path(os.path.abspath(path)).relative_to(root).as_posix()
    except ValueError:
        return path.resolve().relative_to(root).as_posix()


def read_description(bids_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The dataset's ``dataset_description.json`` (empty when unreadable)."""
    try:
        return json.loads((Path(bids_dir) / "dataset_description.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------------- output


def derivative_description(source_dir: str | os.PathLike[str], *, version: str, model_name: str,
                           model_hash: str, settings_hash: str, name: str = "brain-anomaly") -> dict[str, Any]:
    """``dataset_description.json`` of the derivatives: DatasetType, GeneratedBy and SourceDatasets."""
    source = Path(source_dir).expanduser().resolve()
    raw = read_description(source)
    source_entry: dict[str, Any] = {"URL": source.as_uri()}
    if raw.get("DatasetDOI"):
        source_entry["DOI"] = raw["DatasetDOI"]
    if raw.get("DatasetVersion") or raw.get("BIDSVersion"):
        source_entry["Version"] = str(raw.get("DatasetVersion") or raw.get("BIDSVersion"))
    return {
        "Name": f"Anomaly maps of {raw.get('Name') or source.name}",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{
            "Name": name, "Version": version,
            "Description": f"unsupervised anomaly maps by model {model_name!r} (weights {model_hash[:16]}), "
                           f"scoring settings {settings_hash[:16]}",
            "ModelName": model_name, "ModelHash": model_hash, "SettingsHash": settings_hash,
        }],
        "SourceDatasets": [source_entry],
        "DatasetLinks": {"raw": source.as_uri()},
    }


def check_existing_description(out_dir: Path, description: dict[str, Any]) -> None:
    """Refuse to mix outputs of another model or settings into one derivatives folder."""
    path = out_dir / "dataset_description.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        made = old["GeneratedBy"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return
    new = description["GeneratedBy"][0]
    for key in ("ModelName", "ModelHash", "SettingsHash"):
        if made.get(key) and made.get(key) != new[key]:
            raise BidsError(f"{out_dir} holds derivatives made with {key} {made.get(key)!r}, not {new[key]!r}; "
                            "write these into another OUTPUT_DIR (one derivatives folder per model and settings)")


def derivative_problems(root: str | os.PathLike[str]) -> list[str]:
    """File names under ``root`` that the BIDS schema's derivative rules do not allow, and problems of its
    ``dataset_description.json`` (bidsschematools); ``.bidsignore`` patterns and dot files are skipped."""
    import fnmatch

    import bidsschematools.rules as bst_rules
    import bidsschematools.schema as bst_schema

    root = Path(root)
    problems: list[str] = []
    description = read_description(root)
    for key in ("Name", "BIDSVersion", "GeneratedBy"):
        if key not in description:
            problems.append(f"dataset_description.json: missing {key}")
    if description.get("DatasetType") != "derivative":
        problems.append("dataset_description.json: DatasetType is not 'derivative'")
    schema = bst_schema.load_schema()
    problems.extend(_description_problems(description, schema))
    regexes = [re.compile(r"(?:.*/)?" + r["regex"])
               for group in (schema.rules.files.common, schema.rules.files.deriv)
               for r in bst_rules.regexify_filename_rules(group, schema, level=2)]
    ignore_file = root / ".bidsignore"
    ignored = [p.strip() for p in ignore_file.read_text().splitlines() if p.strip()] if ignore_file.is_file() else []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if name.startswith(".") or any(fnmatch.fnmatch(rel, p.strip("/")) or fnmatch.fnmatch(name, p)
                                           or rel.startswith(p.rstrip("/") + "/") for p in ignored):
                continue
            if not any(rx.match(rel) for rx in regexes):
                problems.append(f"{rel}: not a valid BIDS derivative file name")
    return problems


_JSON_TYPES: dict[str, type | tuple[type, ...]] = {"string": str, "array": list, "object": dict, "number": (int, float), "integer": int}


def _description_problems(description: dict[str, Any], schema: Any) -> list[str]:
    """Types of the ``dataset_description.json`` fields the schema defines, and the required fields of
    their objects (``GeneratedBy`` entries need a ``Name``)."""
    problems = []
    for key, value in description.items():
        spec = schema.objects.metadata.get(key)
        if spec is None:
            continue
        spec = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
        kind = _JSON_TYPES.get(str(spec.get("type")))
        if kind is not None and not isinstance(value, kind):
            problems.append(f"dataset_description.json: {key} should be a JSON {spec.get('type')}")
            continue
        items = spec.get("items") or {}
        for i, entry in enumerate(value if isinstance(value, list) else []):
            item_kind = _JSON_TYPES.get(str(items.get("type")))
            if item_kind is not None and not isinstance(entry, item_kind):
                problems.append(f"dataset_description.json: {key}[{i}] should be a JSON {items.get('type')}")
                continue
            for required in items.get("required", []) if isinstance(entry, dict) else []:
                if required not in entry:
                    problems.append(f"dataset_description.json: {key}[{i}] lacks {required}")
    return problems

"""The one JSON rule of the project: what may be stored or written as JSON, and how it is read back.

``to_jsonable`` makes a copy that JSON columns accept on every backend and that ``json.dumps(...,
allow_nan=False)`` writes: tuples and sets become lists, numpy scalars and arrays plain numbers and
lists, paths strings, datetimes ISO strings, records (anything with ``to_dict``) their dictionaries,
and non-finite floats ``None`` (PostgreSQL's JSON type and strict JSON reject NaN and infinity).
Anything else is refused with a ``TypeError`` naming the value, so nothing is silently stringified.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from anomaly.fileio import write_text_atomic


def to_jsonable(value: Any) -> Any:
    """A JSON-ready copy of ``value`` (see the module docstring for the rule)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "to_dict") and callable(value.to_dict):  # typed records
        return to_jsonable(value.to_dict())
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return to_jsonable(value.tolist())
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    raise TypeError(
        f"cannot store {type(value).__name__} value {value!r} as JSON; "
        "convert it to numbers, strings, lists or dicts first"
    )


def dumps(value: Any, *, indent: int | None = 2, sort_keys: bool = False) -> str:
    """Strict JSON text of ``value`` after :func:`to_jsonable` (never NaN or Infinity)."""
    return json.dumps(to_jsonable(value), indent=indent, sort_keys=sort_keys, allow_nan=False)


def write_json(path: str | os.PathLike[str], value: Any) -> Path:
    """Write ``value`` as strict JSON atomically (temporary file, then rename), ending with a newline."""
    return write_text_atomic(path, dumps(value) + "\n")


def read_json(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
    """Parse a JSON file; a missing or malformed file raises ``ValueError`` with one line naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ValueError(f"{path}: {what} not found; check the path") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the {what} ({exc}); check the file") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                         f"fix or rewrite the {what}") from exc

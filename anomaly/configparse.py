"""The one strict builder of typed settings: every YAML or JSON configuration (scoring settings, model
families, a model folder's ``anomaly_model.json``, training recipes) becomes a frozen dataclass here.

Rules: keys are the dataclass's fields (a field with ``metadata={"parse": False}`` is not read from
files); an unknown key is refused with its dotted name and the allowed ones; a missing required key is
named; values are checked against the field's type (numbers for floats, YAML's ``1e-4`` included,
lists of the right length for tuples, mappings for nested dataclasses and dicts); any error is one line
that starts with the file when one is given. Stored records read back leniently (``lenient=True``):
unknown keys and values of the wrong type are dropped, so an older or newer row never breaks a reader.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from anomaly.jsonio import read_json

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or value that cannot be used; the message names the key and the fix."""


class _Mismatch(ValueError):
    """A value of the wrong type (internal: becomes a ConfigError, or a dropped value when lenient)."""


def parsed_fields(cls: type) -> list[dataclasses.Field[Any]]:
    """The fields of a config dataclass that files may set."""
    return [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("parse", True)]


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if hint is float:
        return "a number"
    if hint is int:
        return "a whole number"
    if hint is bool:
        return "true or false"
    if hint is str:
        return "a text"
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).removeprefix('a ')}s"
        return f"a list of {len(args)} values"
    if origin in (list, set, frozenset):
        return "a list"
    if origin is dict or hint is dict or (dataclasses.is_dataclass(hint) and isinstance(hint, type)):
        return "a mapping"
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, where: str, source: str, lenient: bool) -> Any:
    """``value`` checked against (and converted to) ``hint``; raises ``_Mismatch`` naming ``where``."""
    if hint is Any or hint is object:
        return value
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where, source, lenient)
            except _Mismatch:
                continue
        raise _Mismatch(f"{where} must be {_describe(hint)}, not {value!r}")
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if not isinstance(value, Mapping):
            raise _Mismatch(f"{where} must be a mapping of settings, not {value!r}")
        try:
            return build(hint, value, where=f"{where}.", source=source or None, lenient=lenient)
        except ConfigError as exc:
            if lenient:
                raise _Mismatch(str(exc)) from exc
            raise
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as text
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch(f"{where} must be a number, not {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch(f"{where} must be a whole number, not {value!r}")
    if hint is bool or hint is str:
        if isinstance(value, hint):
            return value
        raise _Mismatch(f"{where} must be {_describe(hint)}, not {value!r}")
    if hint is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        raise _Mismatch(f"{where} must be a path, not {value!r}")
    args = typing.get_args(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(f"{where} must be {_describe(hint)}, not {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]", source, lenient) for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise _Mismatch(f"{where} must be a list of {len(args)} values, not {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]", source, lenient) if args else v
                     for i, (v, a) in enumerate(zip(value, args or [Any] * len(value), strict=True)))
    if origin is list or hint is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(f"{where} must be a list, not {value!r}")
        item = args[0] if args else Any
        return [_coerce(v, item, f"{where}[{i}]", source, lenient) for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch(f"{where} must be a mapping, not {value!r}")
        key_hint, item = args if args else (Any, Any)
        return {_coerce(k, key_hint, f"{where} key", source, lenient): _coerce(v, item, f"{where}.{k}", source, lenient)
                for k, v in value.items()}
    return value


def build(cls: type[T], data: Mapping[str, Any] | None, where: str = "", *,
          source: str | os.PathLike[str] | None = None, lenient: bool = False) -> T:
    """``cls`` (a dataclass) from a mapping, by the rules of the module docstring.

    ``where`` prefixes key names (``"map."``), ``source`` (a file) starts every message."""
    prefix = f"{os.fspath(source)}: " if source is not None else ""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix}{where.rstrip('.') or cls.__name__} must be a mapping of settings, not {data!r}")
    fields = parsed_fields(cls)
    names = [f.name for f in fields]
    unknown = sorted(str(k) for k in data if k not in names)
    if unknown and not lenient:
        raise ConfigError(f"{prefix}unknown setting(s) {', '.join(where + k for k in unknown)}; "
                          f"allowed: {', '.join(where + k for k in names)}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in fields:
        if f.name not in data:
            continue
        try:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], where + f.name, os.fspath(source or ""), lenient)
        except _Mismatch as exc:
            if not lenient:
                raise ConfigError(f"{prefix}{exc}") from None
    missing = [where + f.name for f in fields if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{prefix}missing setting(s) {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if prefix and not str(exc).startswith(prefix):
            raise ConfigError(f"{prefix}{exc}") from exc
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix}bad setting(s) {where.rstrip('.') or cls.__name__}: {exc}") from exc


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping with an error that names the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found; check the path") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc}); check the file") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return data


def load_json(path: str | os.PathLike[str], what: str = "JSON file") -> dict[str, Any]:
    """Read a JSON mapping with an error that names the file."""
    try:
        data = read_json(path, what)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level of the {what}")
    return data


def parse_file(cls: type[T], path: str | os.PathLike[str]) -> T:
    """``cls`` from a YAML (``.yaml``/``.yml``) or JSON file, strictly."""
    data = load_json(path) if str(path).endswith(".json") else load_yaml(path)
    return build(cls, data, source=path)

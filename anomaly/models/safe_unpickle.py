"""Read `torch.save` files without running pickled code or importing the modules they name.

Every class or function a pickle names becomes an inert stand-in that only records how the object
was built; only a short allow-list (tensor rebuilders, storages, dtypes, OrderedDict, set) is real.
"""

from __future__ import annotations

import collections
import contextlib
import io
import pickle
import struct
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import torch

__all__ = [
    "CheckpointFormatError",
    "Inert",
    "extract_state_dict",
    "is_inert_module",
    "safe_load",
]

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# Names of the legacy typed storages, as they appear in pickles; new dtypes use UntypedStorage.
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexDoubleStorage": torch.complex128,
    "ComplexFloatStorage": torch.complex64,
    "UntypedStorage": torch.uint8,
}
_STORAGE_MODULES = frozenset({"torch", "torch.cuda"})
# Read from the module's own namespace (no attribute hooks run); only real dtype objects qualify.
_DTYPES: dict[str, torch.dtype] = {k: v for k, v in vars(torch).items() if isinstance(v, torch.dtype)}


class CheckpointFormatError(ValueError):
    """A file is not a readable `torch.save` checkpoint, or holds something this reader refuses."""


class Inert:
    """Base of the stand-ins for pickled classes: records arguments and state, runs nothing.

    A subclass is made per `module.name` found in the pickle. Instances keep the constructor
    arguments (`args`, `kwargs`), the `BUILD` state (`state`, e.g. a module's `__dict__`) and any
    dict items (`dict_items`) or list entries (`list_items`) the pickle added.
    """

    inert_module: str = ""
    inert_name: str = ""
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: Any
    dict_items: dict[Any, Any]
    list_items: list[Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        obj = object.__new__(cls)
        obj.args = args
        obj.kwargs = kwargs
        obj.state = None
        obj.dict_items = {}
        obj.list_items = []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Accept and ignore constructor arguments; `__new__` has recorded them."""

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.dict_items[key] = value

    def append(self, value: Any) -> None:
        """Record an entry added by the pickle's APPEND opcode."""
        self.list_items.append(value)

    def extend(self, values: Iterable[Any]) -> None:
        """Record entries added by the pickle's APPENDS opcode."""
        self.list_items.extend(values)

    @classmethod
    def qualified_name(cls) -> str:
        """The `module.name` this stand-in replaces."""
        return f"{cls.inert_module}.{cls.inert_name}"

    def __repr__(self) -> str:
        return f"<inert {self.qualified_name()}>"


@dataclass(frozen=True)
class _StorageType:
    """Marker for a pickled storage class: only its element type matters."""

    name: str
    dtype: torch.dtype


@dataclass(frozen=True)
class _TensorType:
    """Marker for `torch.Tensor` / `torch.nn.Parameter` named by `_rebuild_from_type_v2`."""

    name: str


@dataclass
class _Storage:
    """Raw bytes of one storage (a flat uint8 tensor) and the element type it was saved with.

    `foreign_order` marks bytes of an untyped storage from a big-endian machine, which cannot be
    reordered without knowing the element type.
    """

    dtype: torch.dtype
    data: torch.Tensor
    foreign_order: bool = False


# ---------------------------------------------------------------------------------------------
# Allow-listed builders: our own code that rebuilds tensors from the archive's data records.


def _check_ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and v >= 0 for v in value):
        raise CheckpointFormatError(f"tensor {what} must be a tuple of non-negative ints, got {value!r}")
    return tuple(value)


def _as_tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype | None) -> torch.Tensor:
    if not isinstance(storage, _Storage):
        raise CheckpointFormatError(f"tensor data must come from a storage record, got {storage!r}")
    if type(offset) is not int or offset < 0:
        raise CheckpointFormatError(f"tensor storage offset must be a non-negative int, got {offset!r}")
    size_t, stride_t = _check_ints(size, "size"), _check_ints(stride, "stride")
    if len(size_t) != len(stride_t):
        raise CheckpointFormatError(f"tensor size {size_t} and stride {stride_t} differ in length")
    dtype = dtype or storage.dtype
    if storage.foreign_order and dtype.itemsize > 1:
        raise CheckpointFormatError("big-endian untyped storages are not supported")
    if storage.data.numel() % dtype.itemsize:
        raise CheckpointFormatError(f"storage of {storage.data.numel()} bytes does not hold whole {dtype} values")
    flat = storage.data.view(dtype) if storage.data.numel() else torch.empty(0, dtype=dtype)
    try:
        return flat.as_strided(size_t, stride_t, offset)
    except RuntimeError as exc:
        raise CheckpointFormatError(f"tensor view lies outside its storage: {exc}") from None


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> torch.Tensor:
    return _as_tensor(storage, offset, size, stride, None)


def _rebuild_tensor_v2(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, metadata: Any = None
) -> torch.Tensor:
    return _as_tensor(storage, offset, size, stride, None)


def _rebuild_tensor_v3(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    hooks: Any,
    dtype: Any,
    metadata: Any = None,
) -> torch.Tensor:
    if not isinstance(dtype, torch.dtype):
        raise CheckpointFormatError(f"tensor dtype must be a torch.dtype, got {dtype!r}")
    return _as_tensor(storage, offset, size, stride, dtype)


def _rebuild_parameter(data: Any, requires_grad: Any, hooks: Any, state: Any = None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise CheckpointFormatError(f"parameter data must be a tensor, got {data!r}")
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    if func not in _TENSOR_BUILDERS or not isinstance(new_type, _TensorType) or not isinstance(args, tuple):
        raise CheckpointFormatError(f"refusing to rebuild a tensor of type {new_type!r} with {func!r}")
    return func(*args)


def _size(values: Any) -> tuple[int, ...]:
    return _check_ints(values, "size")


def _codecs_encode(text: Any, encoding: Any = "latin1") -> bytes:
    """Protocol-2 pickles store `bytes` as `_codecs.encode(str, 'latin1')`; nothing else is accepted."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointFormatError(f"refusing _codecs.encode({text!r:.40}, {encoding!r})")
    return text.encode("latin1")


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """Protocol 0/1 spelling of `cls.__new__(cls)`, allowed for inert classes only."""
    if isinstance(cls, type) and issubclass(cls, Inert):
        return cls.__new__(cls)
    raise CheckpointFormatError(f"refusing copyreg._reconstructor for {cls!r}")


_TENSOR_BUILDERS: frozenset[Callable[..., Any]] = frozenset(
    {_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter}
)

_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): _codecs_encode,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("torch", "Size"): _size,
    ("torch", "Tensor"): _TensorType("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _TensorType("torch.nn.Parameter"),
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
}
_MODULE_ALIASES = {"torch.tensor": "torch._tensor", "__builtin__": "builtins"}


# ---------------------------------------------------------------------------------------------
# The unpickler.


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler whose `find_class` never imports: allow-listed builders or inert stand-ins."""

    def __init__(self, file: BinaryIO, load_storage: Callable[[tuple[Any, ...]], Any] | None) -> None:
        super().__init__(file, encoding="utf-8")
        self._load_storage = load_storage
        self._stand_ins: dict[tuple[str, str], type[Inert]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise CheckpointFormatError(f"malformed global reference {module!r}.{name!r}")
        module = _MODULE_ALIASES.get(module, module)
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        if module in _STORAGE_MODULES and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        key = (module, name)
        if key not in self._stand_ins:
            label = name.replace(".", "_") or "unnamed"
            self._stand_ins[key] = type(label, (Inert,), {"inert_module": module, "inert_name": name})
        return self._stand_ins[key]

    def persistent_load(self, pid: Any) -> Any:
        if self._load_storage is None:
            raise CheckpointFormatError(f"unexpected persistent reference {pid!r:.80}")
        if not isinstance(pid, tuple) or not pid:
            raise CheckpointFormatError(f"malformed persistent reference {pid!r:.80}")
        return self._load_storage(pid)


def _unpickle(file: BinaryIO, load_storage: Callable[[tuple[Any, ...]], Any] | None, path: Path) -> Any:
    try:
        return _SafeUnpickler(file, load_storage).load()
    except CheckpointFormatError as exc:
        raise CheckpointFormatError(f"{path}: {exc}") from None
    except Exception as exc:  # any malformed pickle surfaces as one clear error
        raise CheckpointFormatError(
            f"{path}: cannot read the pickled data ({type(exc).__name__}: {exc}); "
            "the file is damaged or is not a PyTorch checkpoint"
        ) from None


def _storage_dtype(storage_type: Any) -> torch.dtype:
    if not isinstance(storage_type, _StorageType):
        raise CheckpointFormatError(f"unknown storage type {storage_type!r}")
    return storage_type.dtype


def _bytes_to_tensor(raw: bytes | bytearray, dtype: torch.dtype, little_endian: bool) -> torch.Tensor:
    """Raw storage bytes as a flat uint8 tensor in this machine's (little-endian) byte order."""
    if not raw:
        return torch.empty(0, dtype=torch.uint8)
    data = torch.frombuffer(raw if isinstance(raw, bytearray) else bytearray(raw), dtype=torch.uint8)
    if not little_endian and dtype.itemsize > 1:
        data = data.view(-1, dtype.itemsize).flip(1).reshape(-1).contiguous()
    return data


# ---------------------------------------------------------------------------------------------
# File formats.


def _check_record(path: Path, info: zipfile.ZipInfo, archive_size: int) -> None:
    """A record must be stored uncompressed (as `torch.save` writes it) with sizes the file can hold, so
    nothing is allocated for sizes the archive merely declares."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointFormatError(f"{path}: record {info.filename!r} is compressed; torch.save stores records "
                                    "uncompressed, so this is not a torch.save checkpoint (re-save it with torch.save)")
    if info.file_size != info.compress_size or info.file_size > archive_size:
        raise CheckpointFormatError(f"{path}: record {info.filename!r} declares {info.file_size} bytes, more than "
                                    f"the {archive_size}-byte file holds: the archive is damaged or hostile")


def _load_zip(path: Path) -> Any:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointFormatError(f"{path}: damaged zip archive ({exc})") from None
    archive_size = path.stat().st_size
    with archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            hint = " (a TorchScript archive? use the original module file)" if any(
                n.endswith("/constants.pkl") for n in names
            ) else ""
            raise CheckpointFormatError(
                f"{path}: zip archive without a single top-level data.pkl; not a torch.save checkpoint{hint}"
            )
        prefix = pickles[0][: -len("data.pkl")]
        little_endian = True
        if f"{prefix}byteorder" in names:
            order = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise CheckpointFormatError(f"{path}: unknown byte order {order!r}")
            little_endian = order == "little"
        available = set(names)
        loaded: dict[str, _Storage] = {}

        def load_storage(pid: tuple[Any, ...]) -> _Storage:
            if len(pid) != 5 or pid[0] != "storage":
                raise CheckpointFormatError(f"unexpected persistent reference {pid!r:.80}")
            _, storage_type, key, _location, numel = pid
            dtype = _storage_dtype(storage_type)
            if not isinstance(key, str) or type(numel) is not int or numel < 0:
                raise CheckpointFormatError(f"malformed storage reference {pid!r:.80}")
            if key in loaded:
                return loaded[key]
            record = f"{prefix}data/{key}"
            if record not in available:
                raise CheckpointFormatError(f"storage record {record!r} is missing from the archive")
            nbytes = numel * dtype.itemsize
            _check_record(path, archive.getinfo(record), archive_size)
            if archive.getinfo(record).file_size < nbytes:
                raise CheckpointFormatError(f"storage record {record!r} is shorter than {nbytes} bytes")
            raw = bytearray(nbytes)
            with archive.open(record) as data_fh:
                if cast(io.BufferedIOBase, data_fh).readinto(raw) != nbytes:
                    raise CheckpointFormatError(f"storage record {record!r} ends early")
            foreign = not little_endian and dtype.itemsize == 1 and storage_type.name == "UntypedStorage"
            loaded[key] = _Storage(dtype, _bytes_to_tensor(raw, dtype, little_endian), foreign)
            return loaded[key]

        _check_record(path, archive.getinfo(pickles[0]), archive_size)
        with archive.open(pickles[0]) as fh:
            return _unpickle(fh, load_storage, path)  # type: ignore[arg-type]


def _load_legacy(path: Path, fh: BinaryIO) -> Any:
    file_size = path.stat().st_size
    magic = _unpickle(fh, None, path)
    if magic != LEGACY_MAGIC_NUMBER:
        raise CheckpointFormatError(f"{path}: not a PyTorch checkpoint (no torch.save header)")
    protocol = _unpickle(fh, None, path)
    if protocol != LEGACY_PROTOCOL_VERSION:
        raise CheckpointFormatError(f"{path}: unsupported legacy checkpoint protocol {protocol!r}")
    sys_info = _unpickle(fh, None, path)
    little_endian = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
    roots: dict[str, tuple[_Storage, int]] = {}
    views: dict[str, _Storage] = {}

    def load_storage(pid: tuple[Any, ...]) -> Any:
        if pid[0] == "module" and len(pid) == 4:
            return pid[1]  # (module, class, source file, source): the class, already inert
        if pid[0] != "storage" or len(pid) != 6:
            raise CheckpointFormatError(f"unexpected persistent reference {pid!r:.80}")
        _, storage_type, root_key, _location, numel, view = pid
        dtype = _storage_dtype(storage_type)
        if not isinstance(root_key, str) or type(numel) is not int or numel < 0:
            raise CheckpointFormatError(f"malformed storage reference {pid!r:.80}")
        if root_key not in roots:
            nbytes = numel * dtype.itemsize
            if nbytes > file_size:
                raise CheckpointFormatError(f"storage {root_key!r} claims {nbytes} bytes, more than the file")
            roots[root_key] = (_Storage(dtype, torch.zeros(nbytes, dtype=torch.uint8)), numel)
        root = roots[root_key][0]
        if view is None:
            return root
        if not isinstance(view, tuple) or len(view) != 3:
            raise CheckpointFormatError(f"malformed storage view {view!r:.80}")
        view_key, offset, view_numel = view
        if view_key not in views:
            start, stop = offset * dtype.itemsize, (offset + view_numel) * dtype.itemsize
            if not (0 <= start <= stop <= root.data.numel()):
                raise CheckpointFormatError(f"storage view {view_key!r} lies outside its storage")
            views[view_key] = _Storage(dtype, root.data[start:stop])
        return views[view_key]

    result = _unpickle(fh, load_storage, path)
    keys = _unpickle(fh, None, path)
    if not isinstance(keys, list):
        raise CheckpointFormatError(f"{path}: malformed storage key list")
    for key in keys:
        if key not in roots:
            raise CheckpointFormatError(f"{path}: data for unknown storage {key!r}")
        storage, numel = roots[key]
        header = fh.read(8)
        if len(header) != 8:
            raise CheckpointFormatError(f"{path}: file ends before the data of storage {key!r}")
        stored = struct.unpack("<q" if little_endian else ">q", header)[0]
        if stored != numel:
            raise CheckpointFormatError(f"{path}: storage {key!r} holds {stored} values, expected {numel}")
        raw = fh.read(storage.data.numel())
        if len(raw) != storage.data.numel():
            raise CheckpointFormatError(f"{path}: file ends inside the data of storage {key!r}")
        if raw:
            storage.data.copy_(_bytes_to_tensor(raw, storage.dtype, little_endian))
    return result


def safe_load(path: str | Path) -> Any:
    """Load a `torch.save` file (zip or legacy format) into tensors, plain containers and inert stand-ins.

    No pickled callable outside the allow-list is ever called and no module is imported, so a
    hostile or foreign checkpoint can be inspected safely. Raises `CheckpointFormatError`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointFormatError(f"{path}: no such file; check the checkpoint path")
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    with open(path, "rb") as fh:
        head = fh.read(1)
        if not head or head != b"\x80":  # every torch.save pickle starts with the PROTO opcode
            is_tar = False
            with contextlib.suppress(OSError):
                is_tar = tarfile.is_tarfile(path)
            reason = "a pre-0.4 tar checkpoint, not supported; re-save it with torch.save" if is_tar else (
                "not a PyTorch checkpoint (neither a torch.save zip archive nor a legacy pickle)"
            )
            raise CheckpointFormatError(f"{path}: {reason}")
        fh.seek(0)
        return _load_legacy(path, fh)


# ---------------------------------------------------------------------------------------------
# Walking what was loaded.


def _module_state(obj: Any) -> dict[str, Any] | None:
    if not isinstance(obj, Inert):
        return None
    state = obj.state
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
        state = state[0]
    if isinstance(state, dict) and isinstance(state.get("_parameters"), Mapping) and isinstance(
        state.get("_modules"), Mapping
    ):
        return state
    return None


def is_inert_module(obj: Any) -> bool:
    """True for an inert stand-in of a pickled `torch.nn.Module` (it has `_parameters` and `_modules`)."""
    return _module_state(obj) is not None


def _describe(obj: Any) -> str:
    if isinstance(obj, Inert):
        return f"an object of class {type(obj).qualified_name()}"
    return f"a {type(obj).__name__}"


MAX_DEPTH = 64
"""Deepest nesting of modules or checkpoint dicts accepted (real models nest a dozen levels at most)."""


def _too_deep(where: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{where or 'the checkpoint'} is nested more than {MAX_DEPTH} levels deep; "
                                 "not a model checkpoint (damaged or hostile)")


def _walk_module(obj: Any, prefix: str, out: dict[str, torch.Tensor], seen: set[int], depth: int = 0) -> None:
    state = _module_state(obj)
    assert state is not None
    if depth > MAX_DEPTH:
        raise _too_deep(f"module {prefix}")
    if id(obj) in seen:
        return
    seen.add(id(obj))
    skip = state.get("_non_persistent_buffers_set") or set()
    skip = skip if isinstance(skip, (set, frozenset)) else set()
    for table in ("_parameters", "_buffers"):
        entries = state.get(table) or {}
        if not isinstance(entries, Mapping):
            raise CheckpointFormatError(f"module {prefix or '<root>'}: {table} is {_describe(entries)}")
        for name, value in entries.items():
            if value is None or (table == "_buffers" and name in skip):
                continue
            if not isinstance(value, torch.Tensor):
                raise CheckpointFormatError(
                    f"{prefix}{name} is {_describe(value)}, not a plain tensor; this reader cannot rebuild it"
                )
            out[f"{prefix}{name}"] = value.detach()  # a fresh tensor object: drops any pickled attributes
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not is_inert_module(child):
            raise CheckpointFormatError(f"submodule {prefix}{name} is {_describe(child)}, not a module")
        _walk_module(child, f"{prefix}{name}.", out, seen, depth + 1)


_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module", "vae", "autoencoder")


def extract_state_dict(obj: Any, _depth: int = 0) -> dict[str, torch.Tensor]:
    """Flatten a loaded checkpoint into `{dotted.name: tensor}` like `nn.Module.state_dict()`.

    Accepts an inert pickled module (walks `_parameters`, persistent `_buffers`, `_modules`), a
    state dict, or a checkpoint dict holding one under `state_dict`/`model`/`module`/... . Names
    keep any prefix they carry (e.g. `first_stage_model.`).
    """
    if _depth > MAX_DEPTH:
        raise _too_deep("")
    if is_inert_module(obj):
        out: dict[str, torch.Tensor] = {}
        _walk_module(obj, "", out, set())
        return out
    if isinstance(obj, Mapping):
        values = list(obj.values())
        if values and all(isinstance(v, torch.Tensor) for v in values):
            if not all(isinstance(k, str) for k in obj):
                raise CheckpointFormatError("state dict has non-string keys")
            return {k: v.detach() for k, v in obj.items()}
        for key in _CONTAINER_KEYS:
            if key in obj and (is_inert_module(obj[key]) or isinstance(obj[key], Mapping)):
                return extract_state_dict(obj[key], _depth + 1)
        keys = ", ".join(repr(k) for k in list(obj)[:12])
        raise CheckpointFormatError(
            f"checkpoint dict holds no state dict (keys: {keys}); expected one of {', '.join(_CONTAINER_KEYS)}"
        )
    if isinstance(obj, Inert) and obj.dict_items:  # a dict subclass, e.g. a custom state-dict type
        return extract_state_dict(dict(obj.dict_items), _depth + 1)
    raise CheckpointFormatError(f"checkpoint holds {_describe(obj)}, not a torch module or state dict")

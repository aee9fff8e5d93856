"""Pieces every trainer shares: seeds and threads, early stopping, atomic checkpoints, a time budget."""

from __future__ import annotations

import os
import pickle
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

Logger = Callable[[str], None]


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator for batch sampling."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def set_threads(threads: int) -> None:
    """Pin torch's intra-op threads (0 keeps torch's own choice)."""
    if threads > 0:
        torch.set_num_threads(threads)


@dataclass
class EarlyStopper:
    """Stops when the validation loss has not improved for ``patience`` checks (0 = never stops)."""

    patience: int = 0
    min_delta: float = 0.0
    best: float = float("inf")
    bad_checks: int = 0

    def update(self, value: float) -> bool:
        """Record a validation loss; True when it is the best so far."""
        if value < self.best - self.min_delta:
            self.best, self.bad_checks = value, 0
            return True
        self.bad_checks += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_checks >= self.patience


@dataclass
class TrainResult:
    """What a trainer returns: the trained module, the last step, the loss history and the best check."""

    model: Any
    step: int
    history: list[dict[str, float]] = field(default_factory=list)
    best_val: float = float("inf")
    stopped: str = "max_steps"


_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.device)


class CheckpointError(ValueError):
    """A training checkpoint that cannot be read safely; the message names the file and the fix."""


def _check_plain(value: Any, where: str = "checkpoint") -> None:
    """Refuse anything `torch.load(weights_only=True)` would not read back: only tensors, numbers,
    strings, None and dicts/lists/tuples of them (the RNG state is a uint8 tensor)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is not a string or int")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(f"{where} is a {type(value).__name__}; a checkpoint holds only tensors, numbers, "
                        "strings and dicts/lists of them")


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write a checkpoint atomically (a crash never leaves half a file behind); its contents must be
    plain (see :func:`_check_plain`) so that it loads with ``weights_only=True``."""
    _check_plain(state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A checkpoint written by :func:`save_checkpoint`, or None when there is none.

    Read with ``weights_only=True``: a file holding pickled code or foreign objects is refused, never run."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{path}: not a checkpoint this trainer wrote, or damaged ({reason}); nothing in it "
                              "was run: delete it (or train into another folder) to start afresh") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a training checkpoint; delete it to "
                              "start afresh")
    return state


class Budget:
    """Wall-clock budget in minutes (0 = unlimited), counted from construction."""

    def __init__(self, minutes: float) -> None:
        self.minutes = minutes
        self.start = time.monotonic()

    @property
    def elapsed_min(self) -> float:
        return (time.monotonic() - self.start) / 60

    @property
    def spent(self) -> bool:
        return self.minutes > 0 and self.elapsed_min >= self.minutes


def print_logger(path: str | os.PathLike[str] | None = None) -> Logger:
    """A logger that prints and, with ``path``, appends each line to a file."""
    def log(line: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        print(f"[{stamp}] {line}", flush=True)
        if path is not None:
            with open(path, "a") as handle:
                handle.write(f"[{stamp}] {line}\n")
    return log

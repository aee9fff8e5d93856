"""The one training loop every stage runs: resume, atomic checkpoints, a time budget, early stopping
and the validation cadence live here; a trainer supplies only its step and its validation."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from anomaly.training.common import Budget, EarlyStopper, Logger, load_checkpoint, save_checkpoint


class Stateful(Protocol):
    """What a checkpoint holds for a module, an optimiser or an EMA: its state dict, and back."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


@dataclass(frozen=True)
class LoopSettings:
    """``name`` labels the log and progress bar; ``monitor`` is the validation figure that early stopping
    (``patience`` checks without improvement; 0 = never) and the best check follow."""

    name: str
    max_steps: int
    monitor: str
    max_minutes: float = 0.0
    val_every: int = 100
    patience: int = 0


@dataclass
class LoopOutcome:
    """Where a loop ended: the last step, every check's record, the best monitored value and why it stopped."""

    step: int
    history: list[dict[str, float]]
    best_val: float
    stopped: str


class TrainingLoop:
    """Runs ``step(step_index) -> {loss parts}`` until ``max_steps``, the time budget or early stopping;
    every ``val_every`` steps (and at the end) runs ``validate() -> {figures}``, logs a record and writes
    the checkpoint (the ``parts``' state dicts, the batch generator, the history, the stopper, and any
    ``extra()`` the trainer keeps, e.g. its best weights)."""

    def __init__(self, settings: LoopSettings, checkpoint: str | os.PathLike[str], parts: Mapping[str, Stateful],
                 generator: torch.Generator, *, log: Logger | None = None, progress: bool = True) -> None:
        self.settings = settings
        self.checkpoint = Path(checkpoint)
        self.parts = dict(parts)
        self.generator = generator
        self.log = log or (lambda line: None)
        self.progress = progress
        self.stopper = EarlyStopper(settings.patience)
        self.history: list[dict[str, float]] = []
        self.step = 0

    def resume(self) -> dict[str, Any] | None:
        """Load the checkpoint when there is one (returns it, for the trainer's own extras), else None."""
        state = load_checkpoint(self.checkpoint)
        if state is None:
            return None
        for key, part in self.parts.items():
            part.load_state_dict(state[key])
        self.generator.set_state(state["generator"])
        self.step, self.history = int(state["step"]), list(state["history"])
        self.stopper.best, self.stopper.bad_checks = float(state["best_val"]), int(state["bad_checks"])
        self.log(f"resumed {self.settings.name} training at step {self.step} from {self.checkpoint}")
        return state

    def run(self, step: Callable[[int], dict[str, float]], validate: Callable[[], dict[str, float]] | None = None,
            *, on_best: Callable[[], None] | None = None,
            extra: Callable[[], dict[str, Any]] | None = None) -> LoopOutcome:
        """Train from the current step; ``on_best`` runs when a check improves the monitored figure."""
        cfg = self.settings
        budget = Budget(cfg.max_minutes)
        stopped = "max_steps"
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=cfg.name, unit="step", disable=not self.progress,
                   mininterval=5)
        running: dict[str, float] = {}
        while self.step < cfg.max_steps:
            parts = step(self.step)
            self.step += 1
            running = {k: 0.9 * running.get(k, v) + 0.1 * v for k, v in parts.items()}
            bar.update(1)
            first = next(iter(running), None)
            if first is not None:
                bar.set_postfix({first: f"{running[first]:.4g}"})
            last = self.step >= cfg.max_steps or budget.spent
            if self.step % cfg.val_every == 0 or last:
                self._check(running, validate, on_best, extra)
                if self.stopper.should_stop:
                    stopped = "early_stop"
                    break
            if budget.spent:
                stopped = "time_budget"
                break
        bar.close()
        self.log(f"{cfg.name} training ended at step {self.step} ({stopped})")
        return LoopOutcome(self.step, self.history, self.stopper.best, stopped)

    def _check(self, running: dict[str, float], validate: Callable[[], dict[str, float]] | None,
               on_best: Callable[[], None] | None, extra: Callable[[], dict[str, Any]] | None) -> None:
        record = {"step": float(self.step), **{f"train_{k}": v for k, v in running.items()}}
        if validate is not None:
            figures = validate()
            record.update(figures)
            if self.settings.monitor in figures and self.stopper.update(figures[self.settings.monitor]) and on_best:
                on_best()
        self.history.append(record)
        self.log(f"{self.settings.name} " + " ".join(f"{k}={v:.5g}" for k, v in record.items()))
        save_checkpoint(self.checkpoint, {
            **{key: part.state_dict() for key, part in self.parts.items()},
            "generator": self.generator.get_state(), "step": self.step, "history": self.history,
            "best_val": self.stopper.best, "bad_checks": self.stopper.bad_checks, **(extra() if extra else {})})


def optimise(loss: torch.Tensor, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
             ema: EMAModel | None = None, max_norm: float = 1.0) -> None:
    """One optimiser step of every trainer: clear the gradients, back-propagate, clip their norm to
    ``max_norm``, step, and move the EMA weights when there are any."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)
    optimizer.step()
    if ema is not None:
        ema.step(module.parameters())


@contextlib.contextmanager
def ema_weights(ema: EMAModel, module: torch.nn.Module) -> Iterator[None]:
    """The module runs with its EMA weights inside the block (validation), its own weights after it."""
    ema.store(module.parameters())
    ema.copy_to(module.parameters())
    try:
        yield
    finally:
        ema.restore(module.parameters())

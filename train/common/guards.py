"""What keeps a long run alive or stops it cleanly: non-finite losses and stop signals.

* :class:`NonFiniteGuard` skips optimiser steps whose loss is inf/NaN (an fp16 overflow, a bad
  batch), counts them, and stops the run with a clear message after ``limit`` in a row: at that
  point the weights themselves have usually diverged and skipping more only wastes the budget.
* :class:`StopSignals` turns Ctrl-C (SIGINT) and SIGTERM (what schedulers send before killing
  a job) into a flag the loop checks after each step, so the run saves a checkpoint and exits
  instead of dying mid-step. A second signal while that happens is not intercepted: it
  interrupts at once, and the atomic checkpoint save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import signal
import threading


class NonFiniteLossError(FloatingPointError):
    """Too many optimiser steps in a row had a non-finite loss."""


class NonFiniteGuard:
    def __init__(self, limit: int):
        self.limit = limit
        self.total = 0  # over the whole run (saved with checkpoints)
        self.in_a_row = 0

    def update(self, finite: bool, step: int, logs: dict, checkpoint: str | None) -> bool:
        """Record one optimiser step; returns True when it must be skipped."""
        if finite:
            self.in_a_row = 0
            return False
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in logs.items() if isinstance(v, float))
            raise NonFiniteLossError(
                f"{self.in_a_row} optimiser steps in a row had a non-finite loss (the last at step "
                f"{step}: {shown}); stopping. The last checkpoint is {checkpoint or 'none (no checkpoint yet)'}. "
                "Try a lower optim.lr, optim.max_grad_norm > 0, or mixed_precision bf16/no instead of "
                "fp16, then resume with --set resume=true."
            )
        return True

    def skipped_message(self, step: int) -> str:
        """The line a trainer prints for a skipped step."""
        return f"step {step}: non-finite loss, step skipped ({self.in_a_row} in a row, {self.total} in this run)"

    def state_dict(self) -> dict:
        return {"total": self.total, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.in_a_row = int(state["total"]), int(state["in_a_row"])


class StopSignals:
    """``with StopSignals() as stop:`` ... ``if stop.requested:`` save and leave."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested: str | None = None  # the signal's name once one arrived
        self._previous: dict = {}

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name
        # Hand the signal back to its previous owner: a second Ctrl-C interrupts at once.
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __enter__(self) -> "StopSignals":
        # Python only lets the main thread install handlers (e.g. not inside a notebook worker).
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
        self._previous.clear()

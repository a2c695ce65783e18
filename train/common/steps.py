"""The optimiser step both trainers share: unscale, clip, step (or skip), and agreeing across
processes; and the exception that says a run was interrupted after saving a checkpoint.

``python -m train`` (every autoencoder recipe) and ``python -m train.ldm`` step their weights
through :func:`step_optimisers`, skip non-finite steps with :class:`train.common.guards.NonFiniteGuard`
after :func:`agree` -ing on them, and stop on a signal the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the run after saving a checkpoint (``.checkpoint``)."""

    def __init__(self, message: str, checkpoint: Path):
        super().__init__(message)
        self.checkpoint = checkpoint


def agree(accelerator: Accelerator, *flags: bool) -> list[bool]:
    """Each flag true on any process -> true on all (one all-reduce; free on one process)."""
    if accelerator.num_processes == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([float(f) for f in flags], device=accelerator.device)
    return [bool(v) for v in accelerator.reduce(t, "max").tolist()]


def step_optimisers(accelerator: Accelerator, groups: list, max_norm: float,
                    measure: bool = False) -> tuple[float | None, bool]:
    """Step each ``(optimizer, parameters, lr)`` of ``groups`` in order, each group's gradients
    clipped to ``max_norm`` first (when > 0). Returns the first group's gradient norm before
    clipping when clipping or ``measure``, else None; and whether the first group's optimiser
    stepped (under fp16 the loss scaler skips an optimiser whose gradients overflowed).

    Under fp16 every optimiser is unscaled with the one scale its gradients were scaled by, each
    is stepped by the scaler, and the scale is updated once. accelerate's ``optimizer.step()``
    updates the shared scaler after each optimiser, and its ``clip_grad_norm_`` unscales every
    optimiser: with those, the discriminator's gradients were divided by the loss scale a second
    time, or unscaled with a scale that had just backed off after the generator overflowed (×2),
    and the scale's growth counted every step twice.
    """
    scaler = accelerator.scaler
    if scaler is not None:
        for optimizer, _, _ in groups:
            accelerator.unscale_gradients(optimizer=optimizer)
    norm, first_stepped = None, True
    for i, (optimizer, params, lr) in enumerate(groups):
        if i == 0 and scaler is not None:
            first_stepped = all_finite(optimizer)  # what the scaler decides by, read before clipping
        if max_norm > 0 or (measure and i == 0):
            group_norm = clip_gradients(params, max_norm)
            norm = group_norm if i == 0 else norm
        set_lr(optimizer, lr)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer.optimizer)  # the plain optimiser: accelerate's would update the scale
    if scaler is not None:
        scaler.update()
    return norm, first_stepped


def all_finite(optimizer) -> bool:
    """Whether every gradient of ``optimizer``'s parameters is finite (one device sync)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return bool(torch.stack([g.isfinite().all() for g in grads]).all()) if grads else True


def clip_gradients(params: list, max_norm: float) -> float:
    """Clip (unscaled) gradients to ``max_norm`` when > 0; returns their norm before clipping."""
    params = [p for p in params if p.grad is not None]
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.stack([p.grad.detach().float().norm() for p in params]).norm()) if params else 0.0


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

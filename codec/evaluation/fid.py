"""rFID: Fréchet Inception Distance (Heusel et al. 2017) between originals and reconstructions.

Computed with torchmetrics' ``FrechetInceptionDistance``, which needs the optional package
``torch-fidelity`` and its Inception-v3 weights (downloaded into the torch hub cache on first
use). When either is missing, :func:`make_rfid` returns ``None`` and a one-line notice saying
how to enable it; no number is ever invented.
"""

from __future__ import annotations

import torch

from codec.images import tensor_to_uint8

ENABLE_HINT = (
    "pip install torch-fidelity and run once with internet access (the Inception weights "
    "weights-inception-2015-12-05-6726825d.pth go to ~/.cache/torch/hub/checkpoints/, "
    "where they can also be copied by hand)"
)


class RFID:
    """Real features are added once; each codec's reconstructions are then scored against them."""

    def __init__(self, metric):
        self.metric = metric
        self.real_done = False

    @staticmethod
    def _uint8(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(tensor_to_uint8(x)).movedim(-1, 1)  # (B, 3, H, W) uint8

    def add_real(self, x: torch.Tensor) -> None:
        self.metric.update(self._uint8(x).to(self.metric.device), real=True)

    def add_fake(self, y: torch.Tensor) -> None:
        self.metric.update(self._uint8(y).to(self.metric.device), real=False)

    def compute_and_reset(self) -> float:
        value = float(self.metric.compute())
        self.metric.reset()  # reset_real_features=False: only the reconstructions are dropped
        self.real_done = True
        return value


def make_rfid(device: torch.device) -> tuple[RFID | None, str | None]:
    """(RFID, None) when Inception can be loaded, else (None, a one-line notice)."""
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics imports it lazily; check up front)
    except ImportError:
        return None, f"rFID skipped: torch-fidelity is not installed; to enable it, {ENABLE_HINT}."
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        metric = FrechetInceptionDistance(feature=2048, reset_real_features=False).to(device)
    except Exception as exc:  # noqa: BLE001  (any failure to fetch/load weights means: no rFID)
        return None, (f"rFID skipped: the Inception weights could not be loaded "
                      f"({type(exc).__name__}: {str(exc)[:120]}); to enable it, {ENABLE_HINT}.")
    return RFID(metric), None

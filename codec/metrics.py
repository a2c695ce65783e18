"""Image-quality metrics on (B, 3, H, W) tensors in [-1, 1], one value per image.

PSNR on 8-bit-equivalent [0, 1] pixels; SSIM (Wang et al. 2004) from torchmetrics, Gaussian
window 11, sigma 1.5; LPIPS (Zhang et al. 2018) with real ImageNet weights via
:mod:`codec.lpips_weights`. The same functions serve training-time validation, evaluation and
benchmarks, so every figure in the project is computed one way.
"""

from __future__ import annotations

import math

import torch
from torchmetrics.functional.image import structural_similarity_index_measure


def _unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped and quantised to 8 bits like a saved PNG."""
    return x.float().clamp(-1, 1).add(1).mul(127.5).round().div(255)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (B,), peak 1.0 on [0, 1] pixels."""
    mse = (_unit(x) - _unit(y)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (B,) on [0, 1] pixels."""
    return structural_similarity_index_measure(
        _unit(x), _unit(y), data_range=1.0, reduction="none"
    )


class LPIPSMetric:
    """Lazily builds the LPIPS network once; call with (x, y) in [-1, 1] -> (B,)."""

    def __init__(self, net: str = "alex", device: str | torch.device = "cpu"):
        self.net, self.device, self._model = net, torch.device(device), None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._model is None:
            from .lpips_weights import load_lpips

            self._model = load_lpips(self.net, device=self.device)
        with torch.no_grad():  # a metric: no gradients wanted here
            d = self._model(x.float().to(self.device), y.float().to(self.device))
        return d.flatten().cpu()


def summarize(values: list[float]) -> dict:
    """Mean and (population) standard deviation of a list of numbers."""
    n = len(values)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    return {"mean": mean, "std": std, "n": n}


def evaluate_pairs(pairs, lpips_metric: LPIPSMetric | None = None) -> dict[str, list[float]]:
    """Per-image PSNR / SSIM / LPIPS for an iterable of (original, reconstruction) batches."""
    out: dict[str, list[float]] = {"psnr": [], "ssim": []}
    if lpips_metric is not None:
        out["lpips"] = []
    for x, y in pairs:
        out["psnr"] += psnr(x, y).tolist()
        out["ssim"] += ssim(x, y).tolist()
        if lpips_metric is not None:
            out["lpips"] += lpips_metric(x, y).tolist()
    return out

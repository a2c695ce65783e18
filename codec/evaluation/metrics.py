"""Image-quality metrics on (B, 3, H, W) tensors in [-1, 1], one value per image.

PSNR on 8-bit-equivalent [0, 1] pixels; SSIM (Wang et al. 2004, without the border the
reference leaves out) and MS-SSIM (Wang, Simoncelli & Bovik 2003, five scales, weights
0.0448 ... 0.1333) from torchmetrics, Gaussian window 11, sigma 1.5; LPIPS (Zhang et al.
2018) with real ImageNet weights via :mod:`codec.evaluation.lpips_weights`;
latent statistics of a KL autoencoder's posterior. The same functions serve training-time
validation, ``vae-codec eval`` and the benchmarks, so every figure in the project is computed
one way.
"""

from __future__ import annotations

import functools
import math

import torch
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    structural_similarity_index_measure,
)

# MS-SSIM halves the image four times and still needs the 11-px window to fit: torchmetrics
# requires side // 16 > 10, i.e. at least 176 px on both sides.
MS_SSIM_MIN_SIDE = 176
# Metric names in the order reports show them; lower is better for LPIPS only.
IMAGE_METRICS = ("psnr", "ssim", "ms_ssim", "lpips_alex", "lpips_vgg")
LOWER_IS_BETTER = {"lpips_alex", "lpips_vgg", "lpips"}


def _unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped and quantised to 8 bits like a saved PNG."""
    return x.float().clamp(-1, 1).add(1).mul(127.5).round().div(255)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (B,), peak 1.0 on [0, 1] pixels."""
    mse = (_unit(x) - _unit(y)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


# SSIM's Gaussian window (11 px, sigma 1.5) reaches 5 px beyond its centre.
SSIM_BORDER = 5


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (B,) on [0, 1] pixels, as Wang et al.'s reference and scikit-image compute it:
    the mean of the SSIM map over the positions where the whole window lies inside the image.
    (torchmetrics' own mean also counts a 5-px border computed on reflected pixels, which reads
    higher: 0.69672 against the reference's 0.69426 on Kodak 1 as JPEG q10.)"""
    _, full = structural_similarity_index_measure(
        _unit(x), _unit(y), data_range=1.0, reduction="none", return_full_image=True
    )
    b = SSIM_BORDER
    return full[..., b:-b, b:-b].flatten(1).mean(1)


def ms_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image MS-SSIM (B,) on [0, 1] pixels; NaN for images under MS_SSIM_MIN_SIDE px.

    Small images get NaN rather than an error so one thumbnail in a folder does not stop an
    evaluation; :func:`summarize` leaves NaNs out and reports how many values it used.
    """
    h, w = x.shape[-2:]
    if min(h, w) < MS_SSIM_MIN_SIDE:
        return torch.full((x.shape[0],), math.nan)
    return multiscale_structural_similarity_index_measure(
        _unit(x), _unit(y), data_range=1.0, reduction="none"
    ).reshape(-1)


@functools.lru_cache(maxsize=None)
def _shared_lpips(net: str, device: torch.device):
    # Frozen and in eval mode, so one copy per (net, device) can serve every caller in the
    # process: evaluating several codecs (or tests) pays the ~2-5 s load once.
    from codec.evaluation.lpips_weights import load_lpips

    return load_lpips(net, device=device)


LPIPS_VGG_BYTES_PER_PIXEL = 300 * 4  # both images' VGG features and temporaries, float32 (measured < 1 KB)


class LPIPSMetric:
    """Lazily builds the LPIPS network once; call with (x, y) in [-1, 1] -> (B,).

    VGG on an image whose untiled pass would exceed the memory budget (``max_memory``, default
    as :mod:`codec.memory`'s) is computed in exact tiles (:mod:`codec.evaluation.lpips_tiles`:
    the whole-image value, memory bounded by the tile)."""

    def __init__(self, net: str = "alex", device: str | torch.device = "cpu", max_memory: int | None = None):
        self.net, self.device, self._model = net, torch.device(device), None
        self.max_memory = max_memory

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._model is None:
            self._model = _shared_lpips(self.net, self.device)
        with torch.no_grad():  # a metric: no gradients wanted here
            if self.net == "vgg" and self._over_budget(x):
                from codec.evaluation.lpips_tiles import tiled_lpips_vgg

                return tiled_lpips_vgg(self._model, x.to(self.device), y.to(self.device)).cpu()
            d = self._model(x.float().to(self.device), y.float().to(self.device))
        return d.flatten().cpu()

    def _over_budget(self, x: torch.Tensor) -> bool:
        from codec.memory import budgets

        budget, _, _ = budgets(self.device, self.max_memory)
        return x.shape[0] * x.shape[-2] * x.shape[-1] * LPIPS_VGG_BYTES_PER_PIXEL > budget


def summarize(values: list[float]) -> dict:
    """Mean and (population) standard deviation of the finite values of a list.

    NaNs (a metric that does not apply to an image, e.g. MS-SSIM on a thumbnail) are left out;
    ``n`` says how many values the figures rest on.
    """
    finite = [v for v in values if not math.isnan(v)]
    n = len(finite)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    mean = sum(finite) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / n)
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


def image_metrics(
    x: torch.Tensor, y: torch.Tensor, lpips_alex: LPIPSMetric, lpips_vgg: LPIPSMetric
) -> dict[str, list[float]]:
    """Every metric of IMAGE_METRICS for one (original, reconstruction) batch, per image."""
    return {
        "psnr": psnr(x, y).tolist(),
        "ssim": ssim(x, y).tolist(),
        "ms_ssim": ms_ssim(x, y).tolist(),
        "lpips_alex": lpips_alex(x, y).tolist(),
        "lpips_vgg": lpips_vgg(x, y).tolist(),
    }


class LatentStats:
    """Running statistics of scaled latents and of the KL to N(0, I), per latent channel.

    ``update(latents, mean=None, logvar=None)`` takes scaled latents (B, C, h, w) and, for KL
    autoencoders, the unscaled posterior; KL per element is
    ``0.5 * (mean^2 + exp(logvar) - 1 - logvar)`` (Kingma & Welling 2014), the quantity the
    training loss sums. Values are kept (subsampled) for a histogram.
    """

    def __init__(self, keep_per_update: int = 20000, seed: int = 0):
        self.sum = self.sum_sq = None
        self.count = 0
        self.kl_sum, self.kl_count = 0.0, 0
        self.keep_per_update = keep_per_update
        self.samples: list[torch.Tensor] = []  # (C, k) per update, for histograms
        self._gen = torch.Generator().manual_seed(seed)

    def update(self, latents: torch.Tensor, mean: torch.Tensor | None = None,
               logvar: torch.Tensor | None = None) -> None:
        z = latents.double().movedim(1, 0).flatten(1)  # (C, B*h*w)
        if self.sum is None:
            self.sum, self.sum_sq = torch.zeros(z.shape[0], dtype=torch.float64), torch.zeros(
                z.shape[0], dtype=torch.float64)
        self.sum += z.sum(1)
        self.sum_sq += z.pow(2).sum(1)
        self.count += z.shape[1]
        k = min(self.keep_per_update, z.shape[1])
        idx = torch.randperm(z.shape[1], generator=self._gen)[:k]
        self.samples.append(z[:, idx].float())
        if mean is not None and logvar is not None:
            m, lv = mean.double(), logvar.double()
            kl = 0.5 * (m.pow(2) + lv.exp() - 1.0 - lv)
            self.kl_sum += kl.sum().item()
            self.kl_count += kl.numel()

    def result(self) -> dict:
        if self.sum is None:
            raise ValueError("LatentStats.result() called before any update()")
        mean = self.sum / self.count
        std = (self.sum_sq / self.count - mean.pow(2)).clamp_min(0).sqrt()
        return {
            "channel_mean": mean.tolist(),
            "channel_std": std.tolist(),
            "kl_per_element": self.kl_sum / self.kl_count if self.kl_count else None,
            "elements_per_channel": self.count,
        }

    def merge(self, other: "LatentStats") -> None:
        """Add what another process's LatentStats saw (several-process eval)."""
        if other.sum is None:
            return
        if self.sum is None:
            self.sum, self.sum_sq = torch.zeros_like(other.sum), torch.zeros_like(other.sum_sq)
        self.sum += other.sum
        self.sum_sq += other.sum_sq
        self.count += other.count
        self.kl_sum += other.kl_sum
        self.kl_count += other.kl_count
        self.samples += other.samples

    def __getstate__(self) -> dict:  # sent between processes: the generator stays behind
        return {k: v for k, v in self.__dict__.items() if k != "_gen"}

    def histogram_values(self) -> torch.Tensor:
        """(C, N) subsample of the scaled latent values seen."""
        return torch.cat(self.samples, dim=1)

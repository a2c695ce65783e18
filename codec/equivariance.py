"""Spatial transforms of images and latents, and how smooth a latent space is.

EQ-VAE (Kouzelis et al. 2025, "EQ-VAE: Equivariance Regularized Latent Space for Improved
Generative Image Modeling") asks a codec to commute with simple spatial transforms τ:
decoding τ(E(x)) should give τ(x). The transforms here act on the last two (spatial) axes of
images and latents alike:

* ``down2`` / ``down4``: 2D downscaling by 1/2 and 1/4, by averaging 2x2 / 4x4 blocks (area
  resampling: the exact anti-aliased downscale when the size divides);
* ``rot90`` / ``rot180`` / ``rot270``: rotations by quarter turns (counter-clockwise).

Measures (``vae-codec eval``, :class:`LatentMeasures`):

* equivariance error of the encoder, per transform: ``mean (E(τx) - τE(x))² / var(τE(x))``,
  the share of the transformed latents' variance the encoder gets wrong (0 = equivariant);
* decoded PSNR, per transform: PSNR of ``D(τE(x))`` against ``τx``;
* high-frequency share: of the latents' spectral energy (per channel, mean removed), the part at
  radial frequencies above half the Nyquist frequency. White noise has 1 - π/16 ≈ 0.80 of its
  energy there; smooth latents little.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from codec.choices import DEFAULT_TRANSFORMS, TRANSFORMS  # noqa: F401  (re-exported)

HIGH_FREQUENCY = 0.5  # of Nyquist: the band counted as "highest frequencies"


def check_transforms(names: list[str], latent_hw: tuple[int, int] | None = None, where: str = "transforms") -> None:
    """Unknown names, or downscalings that do not divide the latent size, are errors."""
    unknown = [n for n in names if n not in TRANSFORMS]
    if unknown:
        raise ValueError(f"{where}: unknown transform(s) {unknown}; choose from {list(TRANSFORMS)}")
    if latent_hw is None:
        return
    for name in names:
        factor = downscale_factor(name)
        if any(side % factor for side in latent_hw):
            raise ValueError(f"{where}: {name} needs latent sides divisible by {factor}, got "
                             f"{latent_hw[0]}x{latent_hw[1]} (images {8 * latent_hw[0]}x{8 * latent_hw[1]}); "
                             f"use image sides that are multiples of {8 * factor}")


def downscale_factor(name: str) -> int:
    return int(name[4:]) if name.startswith("down") else 1


def apply(name: str, t: torch.Tensor) -> torch.Tensor:
    """Transform ``name`` on (..., H, W) images or latents."""
    if name.startswith("down"):
        factor = downscale_factor(name)
        flat = t.reshape(-1, *t.shape[-3:]) if t.ndim >= 3 else t[None, None]
        return F.avg_pool2d(flat, factor).reshape(*t.shape[:-2], t.shape[-2] // factor, t.shape[-1] // factor)
    if name.startswith("rot"):
        return torch.rot90(t, int(name[3:]) // 90, dims=(-2, -1))
    raise ValueError(f"unknown transform {name!r}; choose from {list(TRANSFORMS)}")


def high_frequency_share(latents: torch.Tensor, cutoff: float = HIGH_FREQUENCY) -> tuple[float, float]:
    """(energy above ``cutoff`` x Nyquist, total energy) of (B, C, h, w) latents, each channel's
    mean removed first; the ratio is the high-frequency share (sums, so images can be pooled)."""
    z = latents.double()
    z = z - z.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(z).abs().pow(2)
    fy = torch.fft.fftfreq(z.shape[-2], dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(z.shape[-1], dtype=torch.float64)[None, :]
    radius = torch.sqrt(fx**2 + fy**2) / 0.5  # 1 = the Nyquist frequency along an axis
    return float(power[..., radius > cutoff].sum()), float(power.sum())


class LatentMeasures:
    """Running equivariance and spectrum measures of one codec over an image set.

    ``update(encode, decode, x, latents)``: ``encode``/``decode`` map images <-> the codec's
    scaled latents; ``latents`` = encode(x), already computed by the caller.
    """

    def __init__(self, transforms: list[str] = DEFAULT_TRANSFORMS):
        check_transforms(transforms)
        self.transforms = list(transforms)
        self.error = {n: [0.0, 0.0] for n in self.transforms}  # squared error, variance (sums)
        self.psnr = {n: [] for n in self.transforms}
        self.high = self.total = 0.0
        self.too_small = 0  # images left out of the equivariance measures

    def update(self, encode, decode, x: torch.Tensor, latents: torch.Tensor) -> None:
        high, total = high_frequency_share(latents)
        self.high, self.total = self.high + high, self.total + total
        multiple = max(downscale_factor(n) for n in self.transforms)
        h, w = (s - s % multiple for s in latents.shape[-2:])
        if not (h and w):  # latents smaller than one downscaling block: nothing to compare
            self.too_small += 1
            return
        if (h, w) != tuple(latents.shape[-2:]):  # border latents depend on the border: encode the crop
            x = x[..., : 8 * h, : 8 * w]
            latents = encode(x)
        for name in self.transforms:
            expected = apply(name, latents)
            got = encode(apply(name, x))
            self.error[name][0] += float((got - expected).double().pow(2).sum())
            self.error[name][1] += float(expected.double().var(dim=(-2, -1), unbiased=False).sum() *
                                         expected.shape[-2] * expected.shape[-1])
            decoded = decode(expected).clamp(-1, 1)
            mse = float((decoded - apply(name, x).clamp(-1, 1)).double().pow(2).mean()) / 4  # [-1, 1] -> [0, 1]
            self.psnr[name].append(10 * math.log10(1 / mse) if mse > 0 else math.inf)

    def merge(self, other: "LatentMeasures") -> None:
        """Add what another process's LatentMeasures saw (several-process eval)."""
        for name in self.transforms:
            self.error[name] = [a + b for a, b in zip(self.error[name], other.error[name])]
            self.psnr[name] += other.psnr[name]
        self.high, self.total = self.high + other.high, self.total + other.total
        self.too_small += other.too_small

    def result(self) -> dict:
        return {
            "transforms": {n: {"latent_error": self.error[n][0] / self.error[n][1] if self.error[n][1] else None,
                               "decoded_psnr": sum(self.psnr[n]) / len(self.psnr[n]) if self.psnr[n] else None}
                           for n in self.transforms},
            "high_frequency_share": self.high / self.total if self.total else None,
            "high_frequency_cutoff": HIGH_FREQUENCY,
            "images_too_small": self.too_small,
        }


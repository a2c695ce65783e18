"""EQ-VAE as published (Kouzelis et al. 2025, "EQ-VAE: Equivariance Regularized Latent Space for
Improved Generative Image Modeling"; the training code of zelaki/eqvae).

Each step draws one of three modes:

* ``latent`` (probability ``p_prior``): τ = a bilinear downscaling of the latent's side L to k
  (k uniform in [L·min_scale, L), min_scale 1/4: the paper's {8..31}/32 at 256-px crops; with ``anisotropic``, k drawn
  for height and width apart) followed by a rotation by 90, 180 or 270°. The decoder decodes
  τ(z), and the step's whole loss (reconstruction, LPIPS, KL, GAN) compares it with τ(x), the
  image scaled to 8k and rotated alike.
* ``image`` (else, probability ``p_prior_s``): prior preservation at low resolution: the image
  is downscaled to 8k before the plain autoencoder pass.
* ``plain``: the usual step.

Where this differs from the reference, and why: the draw comes from (seed, rank, step), not
Python's global ``random``, so a resumed run repeats it; the discriminator step of the same
optimiser step sees the same pair (the reference, under Lightning, draws again for it); sizes are
given as sizes, not scale factors, so latents whose side is not a power of two (where
``L * k / L`` rounds down in floating point) get exactly k. At L = 32 the resampling equals the
reference's ``interpolate(scale_factor=k/32)`` bit for bit (a test checks it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

MODES = ("plain", "image", "latent")


@dataclass(frozen=True)
class Draw:
    mode: str  # plain, image or latent
    size: tuple[int, int] | None = None  # the latent's (height, width) after downscaling
    angle: int = 0  # quarter turns

    def latent(self, z: torch.Tensor) -> torch.Tensor:
        """τ(z) of a ``latent`` step."""
        return turn(resize(z, self.size), self.angle)

    def image(self, x: torch.Tensor) -> torch.Tensor:
        """The image the decoding is compared with (latent steps) or that is encoded (image steps)."""
        if self.mode == "plain":
            return x
        return turn(resize(x, (8 * self.size[0], 8 * self.size[1])), self.angle)


def resize(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)


def turn(t: torch.Tensor, angle: int) -> torch.Tensor:
    return torch.rot90(t, k=angle, dims=[-1, -2]) if angle else t  # the reference's direction


def draw(seed: int, rank: int, step: int, latent_side: int, p_prior: float = 0.5, p_prior_s: float = 0.25,
         anisotropic: bool = False, min_scale: float = 0.25) -> Draw:
    """This step's mode and τ, from its own stream per (seed, rank, step)."""
    rng = np.random.default_rng([seed, rank, step, 0xE0])
    sides = range(max(1, math.ceil(latent_side * min_scale)), latent_side)

    def side() -> int:
        return int(sides[rng.integers(len(sides))])

    if rng.random() < p_prior:
        h = side()
        w = side() if anisotropic else h
        return Draw("latent", (h, w), int(rng.integers(1, 4)))
    if rng.random() < p_prior_s:
        h = side()
        return Draw("image", (h, side() if anisotropic else h))
    return Draw("plain")

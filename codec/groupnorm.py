"""GroupNorm with statistics chosen from outside: the tile's own, whole-image estimates, or
exact whole-image sums, for tiled encoding and decoding (:mod:`codec.tiling`,
:mod:`codec.streaming`).

GroupNorm (Wu & He 2018) normalises each group of channels with its mean and variance over
the group's channels and all pixels; over a whole image, those are pooled from per-tile sums of
x and x^2 (mean = E[x], var = E[x^2] - E[x]^2), accumulated in float64.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn


class StopForward(Exception):
    """Raised inside a forward pass once the GroupNorm layer being measured has been summed."""


class TileNorms:
    """Routes every GroupNorm of a model through one place that decides which statistics
    normalise the current tile, and pools each layer's sums over the tiles' owned regions.

    modes: ``own`` (the tile's own statistics, as plain GroupNorm), ``fixed`` (whole-image
    estimates in :attr:`fixed`). With :attr:`pooling` on, every layer's input is summed over
    the current tile's owned region into :attr:`sums`.
    """

    def __init__(self, model: nn.Module):
        self.norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
        self.mode = "own"
        self.pooling = False
        self.stop_at = None  # a GroupNorm: sum its input, then end the forward pass (StopForward)
        self.fixed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (mean, var), (B, G)
        self.sums: dict[int, list] = {}  # id -> [sum, sum of squares, count]
        self.owned = None    # owned box inside the current tile (top, bottom, left, right), latents
        self.tile_hw = None  # the current tile's (h, w) in latent units

    def _owned_view(self, x: torch.Tensor) -> torch.Tensor:
        """The part of activation ``x`` (B, C, ...) in the current tile's owned region."""
        th, tw = self.tile_hw
        if x.ndim == 3:  # attention's GroupNorm sees (B, C, H*W)
            r = math.isqrt(x.shape[-1] // (th * tw))
            x = x.reshape(*x.shape[:2], th * r, tw * r)
        r_h, r_w = x.shape[-2] / th, x.shape[-1] / tw
        top, bottom, left, right = self.owned
        return x[..., round(top * r_h) : round(bottom * r_h), round(left * r_w) : round(right * r_w)]

    def forward(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        key = id(norm)
        b, g = x.shape[0], norm.num_groups
        xg = x.float().reshape(b, g, -1)
        if self.pooling or norm is self.stop_at:
            part = self._owned_view(x).double().reshape(b, g, -1)
            acc = self.sums.setdefault(key, [0.0, 0.0, 0])
            acc[0] = acc[0] + part.sum(-1)
            acc[1] = acc[1] + part.pow(2).sum(-1)
            acc[2] += part.shape[-1]
            if norm is self.stop_at:
                raise StopForward
        if self.mode == "own":
            mean, var = xg.mean(-1), xg.var(-1, unbiased=False)

        else:
            mean, var = self.fixed[key]
        y = (xg - mean[..., None]) * torch.rsqrt(var[..., None] + norm.eps)
        y = y.reshape(x.shape)
        if norm.affine:
            shape = (1, -1) + (1,) * (x.ndim - 2)
            y = y * norm.weight.float().reshape(shape) + norm.bias.float().reshape(shape)
        return y.to(x.dtype)

    def pooled(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The pooled sums as whole-image (mean, var) per layer; the sums are reset."""
        out = {}
        for key, (s, s2, n) in self.sums.items():
            mean = s / n
            out[key] = (mean.float(), (s2 / n - mean * mean).clamp_min(0).float())
        self.sums = {}
        return out

    @staticmethod
    def residual(used: dict, seen: dict) -> float:
        """Largest relative difference between two sets of statistics: a mean's in standard
        deviations, a variance's as a fraction."""
        worst = 0.0
        for key, (mean, var) in used.items():
            seen_mean, seen_var = seen[key]
            scale = var + 1e-6
            worst = max(worst, float(((seen_mean - mean).abs() / scale.sqrt()).max()),
                        float(((seen_var - var).abs() / scale).max()))
        return worst

    @contextlib.contextmanager
    def installed(self):
        """Route every GroupNorm of the model through :meth:`forward` while inside."""
        for norm in self.norms:
            norm.forward = (lambda x, _n=norm: self.forward(_n, x))
        try:
            yield self
        finally:
            for norm in self.norms:
                del norm.forward  # back to the class's forward

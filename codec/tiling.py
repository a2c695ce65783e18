"""Tiled encoding and decoding: any image size, device memory bounded by the tile, no seams.

Three methods (``tile_method``), best first:

- ``"exact"`` (the default): the untiled result, to floating-point rounding, computed one tile
  at a time (:mod:`codec.streaming`): each high-resolution stage runs over halo'd tiles with
  exact whole-image GroupNorm statistics, the latent-resolution mid block untiled. Costs ~1.2-1.5
  untiled runs; the device holds one tile, the host two whole-image activations of the widest
  full-resolution stage. Where those do not fit in half the available host memory, or the model
  is not the diffusers kl-f8 layout, it falls back to ``"blend"`` and says so (once per codec).
- ``"stats"``: bounded host memory too. One *statistics pass* over tiles that partition the
  image, each normalised with its own statistics, pools every GroupNorm layer's sums (pooled
  E[x] and E[x^2] give the whole-image mean and variance: exact for the first layer, close for
  the later ones); the output pass then normalises every tile with them. Measured far better
  than ``"blend"`` on most images but not all (BENCHMARKS.md, "Tiling"); if the statistics the
  output pass sees stray wildly from the estimate, or the output is not finite, it is redone
  with ``"blend"`` with a warning.
- ``"blend"``: plain overlap-and-blend, each tile normalised with its own statistics (what
  diffusers' ``enable_tiling()`` does; GroupNorm then gives each tile its own brightness and
  contrast: colour steps between tiles).

``"stats"`` and ``"blend"`` overlap neighbouring tiles by ``overlap`` pixels (default a quarter
of the tile) and blend them with linear ramps, so a pixel near one tile's edge is mostly taken
from the tile it lies deeper inside. Their cost at 2048² is under 3 untiled decodes (counted in
tests/test_tiling.py); their mid-block attention is tile-local.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from codec import streaming
from codec.choices import DEFAULT_TILE_METHOD as DEFAULT_METHOD
from codec.choices import TILE_METHODS as METHODS
from codec.groupnorm import TileNorms
from codec.io import is_autoencoder_tiny
from codec.memory import available_host_bytes

DOWNSAMPLE = 8
HOST_MEMORY_FRACTION = 0.5  # of the available host memory, for the exact path's activations
# Largest relative residual (a mean's error in standard deviations, or a variance's as a
# fraction) between the statistics the output pass normalised with and those it then measured,
# above which "stats" is taken to have diverged and falls back to "blend". Tile-local context
# alone makes the residual nonzero even with the untiled run's exact statistics (0.01-0.33
# measured); the one-pass estimate measured 0.02-4.8 on random, 40-step and trained weights
# and was better than "blend" on every image (BENCHMARKS.md, "Tiling"). An estimate off by
# more than an order of magnitude beyond that is not trusted.
STATS_TOLERANCE = 50.0

Span = tuple[int, int]


# ------------------------------------------------------------------------- the tile grid
def tile_spans(length: int, tile: int, overlap: int) -> list[Span]:
    """``[start, end)`` spans of at most ``tile`` covering ``range(length)``, neighbours
    overlapping by at least ``overlap``, all of one size and spread evenly (so no thin last
    tile, whose own statistics and context would be poor)."""
    if length <= tile:
        return [(0, length)]
    n = math.ceil((length - overlap) / (tile - overlap))
    size = math.ceil((length + (n - 1) * overlap) / n)  # <= tile
    starts = [round(i * (length - size) / (n - 1)) for i in range(n)]
    return [(s, s + size) for s in starts]


def owned_spans(spans: list[Span]) -> list[Span]:
    """The part of each span that it alone accounts for: overlaps are split at their middle,
    so the owned spans partition the whole length (used to pool statistics exactly once)."""
    cuts = [spans[0][0]] + [(a[1] + b[0]) // 2 for a, b in zip(spans, spans[1:])] + [spans[-1][1]]
    return list(zip(cuts, cuts[1:]))


def blend_ramp(spans: list[Span], i: int, scale: int) -> torch.Tensor:
    """Weights (size * scale,) for span ``i``: 1 inside, linear ramps across the overlaps with
    its neighbours; the ramps of two neighbours add up to exactly 1 across their overlap."""
    start, end = spans[i]
    pos = torch.arange(start * scale, end * scale, dtype=torch.float32) + 0.5
    weight = torch.ones_like(pos)
    if i > 0 and spans[i - 1][1] > start:
        weight = torch.minimum(weight, (pos - start * scale) / ((spans[i - 1][1] - start) * scale))
    if i + 1 < len(spans) and spans[i + 1][0] < end:
        weight = torch.minimum(weight, (end * scale - pos) / ((end - spans[i + 1][0]) * scale))
    return weight


def blend_weights(spans: list[Span], scale: int) -> list[torch.Tensor]:
    """Each span's :func:`blend_ramp` divided by the sum of the ramps at every position, so the
    weights add up to exactly 1 everywhere, whatever the overlap: with an overlap near half a
    tile, spans ``i - 1`` and ``i + 1`` can overlap too, where the neighbours' ramps alone would
    add up to more than 1 (a band too bright)."""
    ramps = [blend_ramp(spans, i, scale) for i in range(len(spans))]
    total = torch.zeros(spans[-1][1] * scale)
    for (start, end), ramp in zip(spans, ramps):
        total[start * scale : end * scale] += ramp
    return [ramp / total[start * scale : end * scale] for (start, end), ramp in zip(spans, ramps)]


def split_tile_size(tile_size: int, overlap: int | None) -> tuple[int, int]:
    """Tile and overlap in pixels -> (tile, overlap) in latent units, checked.

    ``tile_size`` is the most the model sees at once, so it bounds the memory; ``overlap``
    defaults to a quarter of the tile.
    """
    if tile_size < 4 * DOWNSAMPLE or tile_size % DOWNSAMPLE:
        raise ValueError(f"tile_size must be a multiple of {DOWNSAMPLE} and >= {4 * DOWNSAMPLE}, got {tile_size}")
    tile = tile_size // DOWNSAMPLE
    if overlap is None:
        return tile, tile // 4
    if overlap < 0 or overlap % DOWNSAMPLE:
        raise ValueError(f"tile_overlap must be a non-negative multiple of {DOWNSAMPLE}, got {overlap}")
    if 2 * (overlap // DOWNSAMPLE) >= tile:
        raise ValueError(f"tile_overlap {overlap} must be less than half the tile ({tile_size} px), "
                         "or neighbouring overlaps would meet and leave a tile no part of its own")
    return tile, overlap // DOWNSAMPLE


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown tile method {method!r}; choose from {', '.join(METHODS)}")
    return method


# ------------------------------------------------------------------------- the tiled runner
_warned: set[int] = set()


def run_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    model: nn.Module,
    x: torch.Tensor,
    latent_hw: tuple[int, int],
    out: torch.Tensor,
    tile_size: int,
    overlap: int | None = None,
    method: str = "stats",
    name: str = "codec",
) -> torch.Tensor:
    """Apply ``fn`` (an encoder or decoder call) to ``x`` tile by tile, writing into ``out``.

    ``x`` and ``out`` are (B, C, H, W); one of them is at latent resolution ``latent_hw`` and
    the other at 8x that (decoding: latents in, pixels out; encoding: the reverse). ``model``
    is the module whose GroupNorm layers get whole-image statistics (see the module docstring).
    """
    if method not in ("stats", "blend"):
        raise ValueError(f"run_tiled runs 'stats' or 'blend', not {method!r}")
    h, w = latent_hw
    tile, ov = split_tile_size(tile_size, overlap)
    if h <= tile and w <= tile:  # fits in one tile: the untiled run is exact
        out.copy_(fn(x).to(out.device, out.dtype))
        return out
    in_scale, out_scale = x.shape[-2] // h, out.shape[-2] // h
    stats = TileNorms(model)

    def sweep(rows: list[Span], cols: list[Span], write: bool):
        """Run every tile of the grid rows x cols; pool over owned regions; blend into out."""
        own_rows, own_cols = owned_spans(rows), owned_spans(cols)
        row_weights, col_weights = blend_weights(rows, out_scale), blend_weights(cols, out_scale)
        for i, (top, bottom) in enumerate(rows):
            for j, (left, right) in enumerate(cols):
                stats.tile_hw = (bottom - top, right - left)
                stats.owned = (own_rows[i][0] - top, own_rows[i][1] - top,
                               own_cols[j][0] - left, own_cols[j][1] - left)
                y = fn(x[..., top * in_scale : bottom * in_scale, left * in_scale : right * in_scale])
                if write:
                    s = out_scale
                    weight = row_weights[i][:, None] * col_weights[j][None, :]
                    out[..., top * s : bottom * s, left * s : right * s] += y.to(out.device, out.dtype) * weight

    rows, cols = tile_spans(h, tile, ov), tile_spans(w, tile, ov)
    with stats.installed():
        out.zero_()
        if method == "blend":
            stats.mode = "own"
            sweep(rows, cols, write=True)
            return out
        # 1. statistics pass: tiles that partition the image, each normalised with its own
        #    statistics; the pooled sums are the whole-image statistics of the first layer
        #    exactly and of later layers closely
        stats.mode, stats.pooling = "own", True
        sweep(tile_spans(h, tile, 0), tile_spans(w, tile, 0), write=False)
        stats.fixed = stats.pooled()
        # 2. the output, every GroupNorm using the whole-image statistics; what the layers
        #    actually see is pooled again to check that the estimate is self-consistent
        stats.mode = "fixed"
        sweep(rows, cols, write=True)
        residual = TileNorms.residual(stats.fixed, stats.pooled())
        if not (residual <= STATS_TOLERANCE and torch.isfinite(out).all()):
            warn_once(model, f"tiled {name}: the whole-image GroupNorm statistics diverged (1 statistics "
                      f"pass + 1 output pass, residual {residual:.3g} > {STATS_TOLERANCE}, or a non-finite "
                      "output); redone with plain overlap-and-blend tiles (tile_method='blend')")
            stats.mode, stats.pooling = "own", False
            out.zero_()
            sweep(rows, cols, write=True)
    return out


def warn_once(model: nn.Module, message: str) -> None:
    """A RuntimeWarning, the first time only for this model and kind of fallback."""
    key = (id(model), message.split(":")[1][:40])
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _exact_or_fallback(vae, part: nn.Module, latent_hw, batch: int, dtype, name: str) -> str:
    """"exact" where it can run here, else "blend" with a warning saying why."""
    need = streaming.host_bytes(list(vae.config.block_out_channels), latent_hw, batch, dtype)
    budget = int(available_host_bytes() * HOST_MEMORY_FRACTION)
    if need > budget:
        warn_once(part, f"tiled {name}: exact tiling would keep {need / 2**30:.1f} GiB of activations "
                        f"in host memory, more than half the available ({budget / 2**30:.1f} GiB); "
                        "using overlap-and-blend tiles (tile_method='blend'; 'stats' is usually "
                        "better, see codec.tiling)")
        return "blend"
    try:
        (streaming.decoder_stages if part is getattr(vae, "decoder", None) else streaming.encoder_stages)(part)
    except streaming.UnsupportedModel as exc:
        warn_once(part, f"tiled {name}: exact tiling does not know this model ({exc}); "
                        "using overlap-and-blend tiles (tile_method='blend')")
        return "blend"
    return "exact"


def _tiny_blends(part: nn.Module, method: str, what: str) -> str:
    """An AutoencoderTiny has no GroupNorm to share: its tiles can only be blended."""
    if method != "blend":
        warn_once(part, f"tiled {what}: an AutoencoderTiny has no GroupNorm statistics to share, so "
                       f"tile_method {method!r} cannot apply; using overlap-and-blend tiles")
    return "blend"


def tiled_decode(vae, z: torch.Tensor, tile_size: int, overlap: int | None = None,
                 method: str = DEFAULT_METHOD, name: str = "codec") -> torch.Tensor:
    """Unscaled latents (B, C, h, w) -> images (B, 3, 8h, 8w) float32 on the CPU, tiled."""
    check_method(method)
    b, _, h, w = z.shape
    tile, _ = split_tile_size(tile_size, overlap)
    out = torch.empty(b, vae.config.out_channels, h * DOWNSAMPLE, w * DOWNSAMPLE)
    if h <= tile and w <= tile:  # fits in one tile: the untiled run
        return out.copy_(vae.decode(z).sample)
    what = f"decoding with {name}"
    if is_autoencoder_tiny(vae):
        method = _tiny_blends(vae.decoder, method, what)
    if method == "exact":
        method = _exact_or_fallback(vae, vae.decoder, (h, w), b, z.dtype, what)
    if method == "exact":
        return streaming.exact_decode(vae, z, tile_size, out)
    return run_tiled(lambda t: vae.decode(t).sample, vae.decoder, z, (h, w), out, tile_size,
                     overlap, method, name=what)


def tiled_encode(vae, x: torch.Tensor, tile_size: int, overlap: int | None = None,
                 method: str = DEFAULT_METHOD, name: str = "codec") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images (B, 3, H, W) -> unscaled posterior (mean, logvar), each (B, C, H/8, W/8) float32 CPU
    (logvar None for an AutoencoderTiny, whose latents are deterministic)."""
    check_method(method)
    b, _, hh, ww = x.shape
    h, w = hh // DOWNSAMPLE, ww // DOWNSAMPLE
    c = vae.config.latent_channels
    tile, _ = split_tile_size(tile_size, overlap)
    what = f"encoding with {name}"
    if is_autoencoder_tiny(vae):  # deterministic latents: a point posterior (logvar -inf)
        if h > tile or w > tile:
            _tiny_blends(vae.encoder, method, what)
        out = torch.empty(b, c, h, w)
        run_tiled(lambda t: vae.encode(t).latents, vae.encoder, x, (h, w), out, tile_size, overlap, "blend", name=what)
        return out, None
    if method == "exact" and (h > tile or w > tile):
        method = _exact_or_fallback(vae, vae.encoder, (h, w), b, x.dtype, what)
    if method == "exact":  # (or one tile: the untiled run)
        if h > tile or w > tile:  # the posterior as diffusers forms it (logvar clamped)
            moments = _moments_of(DiagonalGaussianDistribution(streaming.exact_encode(vae, x, tile_size)))
        else:
            moments = _moments(vae, x)
        out = moments.float().cpu()
    else:
        out = torch.empty(b, 2 * c, h, w)
        run_tiled(lambda t: _moments(vae, t), vae.encoder, x, (h, w), out, tile_size, overlap, method, name=what)
    return out[:, :c], out[:, c:]


def _moments(vae, x: torch.Tensor) -> torch.Tensor:
    return _moments_of(vae.encode(x).latent_dist)


def _moments_of(dist) -> torch.Tensor:
    return torch.cat([dist.mean, dist.logvar], 1)

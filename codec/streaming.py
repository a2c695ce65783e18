"""Exact tiled encoding and decoding: the untiled result, with the model run one tile at a time.

A kl-f8 encoder or decoder is a chain of *stages* (ResNet blocks, up/downsamplers, the output
head); inside a stage everything is local (3x3 convolutions, SiLU) except GroupNorm, whose
statistics are whole-image sums. So each high-resolution stage is run tile by tile over the
stage's whole input, kept in host memory:

- every tile is cut with a ``halo`` of real neighbouring pixels that covers the stage's
  receptive field (two 3x3 convolutions: 2 pixels), and only its centre is kept, so the
  convolutions see exactly the context they see untiled;
- each GroupNorm layer of the stage gets exact whole-image statistics first: a pass over the
  tiles runs the stage only up to that layer (the layers before it already exact) and sums its
  input over the tiles' centres. A ResNet block has two GroupNorm layers: the first pass stops
  at once, the second costs its first convolution, so the whole costs ~1.5 untiled runs.

The low-resolution trunk (the latent-resolution mid block with its attention, 1/64 of the
pixels) runs untiled, so attention stays global. The result equals the untiled run up to
floating-point rounding. The device holds one tile; the host holds the stage's input and
output, two whole-image activations of the widest high-resolution stage
(:func:`host_bytes`), which is what "where memory allows" means in :mod:`codec.tiling`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from codec.groupnorm import StopForward, TileNorms

HALO = 2  # pixels of context a stage needs on each side: two 3x3 convolutions


class UnsupportedModel(ValueError):
    """The encoder/decoder is not the diffusers kl-f8 layout this executor knows."""


def _resnets_and_samplers(blocks, samplers_attr: str):
    for block in blocks:
        if not hasattr(block, "resnets"):
            raise UnsupportedModel(f"{type(block).__name__} has no resnets")
        for resnet in block.resnets:
            if getattr(resnet, "upsample", None) is not None or getattr(resnet, "downsample", None) is not None:
                raise UnsupportedModel("ResNet blocks that resample themselves")
            yield _NoTemb(resnet), 1.0
        for sampler in getattr(block, samplers_attr, None) or []:
            yield sampler, 2.0 if samplers_attr == "upsamplers" else 0.5


class _NoTemb(nn.Module):
    """A ResNet block called as a one-argument stage (the VAE has no time embedding)."""

    def __init__(self, resnet):
        super().__init__()
        self.resnet = resnet

    def forward(self, x):
        return self.resnet(x, None)


def decoder_stages(decoder) -> tuple[nn.Module, list[tuple[nn.Module, float]]]:
    """(the latent-resolution trunk, [(stage, output scale)]) of a diffusers Decoder."""
    if not all(hasattr(decoder, a) for a in ("conv_in", "mid_block", "up_blocks", "conv_norm_out", "conv_out")):
        raise UnsupportedModel(f"{type(decoder).__name__} is not a diffusers kl-f8 Decoder")
    def trunk(z):
        return decoder.mid_block(decoder.conv_in(z))

    stages = list(_resnets_and_samplers(decoder.up_blocks, "upsamplers"))
    stages.append((nn.Sequential(decoder.conv_norm_out, decoder.conv_act, decoder.conv_out), 1.0))
    return trunk, stages


def encoder_stages(encoder) -> tuple[list[tuple[nn.Module, float]], nn.Module]:
    """([(stage, output scale)], the latent-resolution trunk) of a diffusers Encoder."""
    if not all(hasattr(encoder, a) for a in ("conv_in", "down_blocks", "mid_block", "conv_norm_out", "conv_out")):
        raise UnsupportedModel(f"{type(encoder).__name__} is not a diffusers kl-f8 Encoder")
    stages = [(encoder.conv_in, 1.0)] + list(_resnets_and_samplers(encoder.down_blocks, "downsamplers"))

    def trunk(h):
        return encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(encoder.mid_block(h))))

    return stages, trunk


def host_bytes(channels: list[int], latent_hw: tuple[int, int], batch: int, dtype: torch.dtype) -> int:
    """Host memory the exact path keeps: a stage's input and output at full resolution, with
    the widest channel count of the two highest-resolution levels (``block_out_channels[:2]``)."""
    h, w = latent_hw
    widest = max(channels[:2])
    return 2 * batch * widest * (8 * h) * (8 * w) * torch.finfo(dtype).bits // 8


def _crop_spans(length_out: int, tile: int) -> list[tuple[int, int]]:
    n = math.ceil(length_out / tile)
    return [(round(i * length_out / n), round((i + 1) * length_out / n)) for i in range(n)]


def run_stage(stage: nn.Module, x: torch.Tensor, scale: float, tile: int, device, out: torch.Tensor | None = None):
    """The untiled ``stage(x)`` computed tile by tile; ``x`` and the result live on the host.

    ``tile`` is the side of an output tile in this stage's pixels; every GroupNorm in the stage
    gets the exact whole-input statistics (module docstring).
    """
    b, _, h, w = x.shape
    oh, ow = round(h * scale), round(w * scale)
    stats = TileNorms(stage)
    tiles = []
    for o0, o1 in _crop_spans(oh, tile):
        for p0, p1 in _crop_spans(ow, tile):
            # input rows the tile needs: its own (o / scale) plus the halo, clipped to the image;
            # a stride-2 stage needs an even start to keep its sampling grid
            a = max(0, math.floor(o0 / scale) - HALO)
            c = max(0, math.floor(p0 / scale) - HALO)
            if scale < 1:
                a, c = a - a % 2, c - c % 2
            bot, right = min(h, math.ceil(o1 / scale) + HALO), min(w, math.ceil(p1 / scale) + HALO)
            tiles.append(((o0, o1, p0, p1), (a, bot, c, right)))

    def sweep(body):
        for (o0, o1, p0, p1), (a, bot, c, right) in tiles:
            stats.tile_hw = (bot - a, right - c)
            # the part of the input this tile accounts for (its output box, in input pixels)
            stats.owned = (round(o0 / scale) - a, round(o1 / scale) - a, round(p0 / scale) - c, round(p1 / scale) - c)
            body((o0, o1, p0, p1), (a, c), x[..., a:bot, c:right].to(device))

    with stats.installed():
        stats.mode = "fixed"

        def measure(_box, _corner, xt):
            try:
                stage(xt)
            except StopForward:
                pass

        for target in stats.norms:  # in forward order: each one's statistics use the exact earlier ones
            stats.stop_at = target
            sweep(measure)
            stats.fixed.update(stats.pooled())
        stats.stop_at = None
        result = None

        def write(box, corner, xt):
            nonlocal result
            o0, o1, p0, p1 = box
            y = stage(xt)
            if result is None:
                result = out if out is not None else torch.empty(b, y.shape[1], oh, ow, dtype=y.dtype)
            ya, yc = round(corner[0] * scale), round(corner[1] * scale)
            result[..., o0:o1, p0:p1] = y[..., o0 - ya : o1 - ya, p0 - yc : p1 - yc].to(result.device, result.dtype)

        sweep(write)
    return result


@torch.no_grad()
def exact_decode(vae, z: torch.Tensor, tile_size: int, out: torch.Tensor) -> torch.Tensor:
    """Unscaled latents (B, C, h, w) on the model's device -> ``out`` (B, 3, 8h, 8w), exact."""
    decoder = vae.decoder
    trunk, stages = decoder_stages(decoder)
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    x = trunk(z).cpu()
    size = tile_size // 8  # tiles cover the same image area at every resolution
    for i, (stage, scale) in enumerate(stages):
        size = round(size * scale)
        x = run_stage(stage, x, scale, size, z.device, out if i == len(stages) - 1 else None)
    return out


@torch.no_grad()
def exact_encode(vae, x: torch.Tensor, tile_size: int) -> torch.Tensor:
    """Images (B, 3, H, W) (host) -> posterior moments (B, 2C, H/8, W/8) on the model's device."""
    device = next(vae.parameters()).device
    stages, trunk = encoder_stages(vae.encoder)
    size = tile_size
    for stage, scale in stages:
        size = round(size * scale)
        x = run_stage(stage, x, scale, max(size, 1), device)
    h = trunk(x.to(device))
    return vae.quant_conv(h) if vae.quant_conv is not None else h

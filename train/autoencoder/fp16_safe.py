"""Making a codec safe in fp16 (``fp16_safe.bound`` > 0): the two tools its recipe
(:mod:`train.autoencoder.recipes.fp16_safe`) uses.

fp16's largest finite value is 65504. SDXL's VAE overflows it because a convolution that feeds a
GroupNorm learned weights far larger than it needs: the GroupNorm divides the scale out again, so
fp32 never notices, while fp16 turns the convolution's output into inf and the norm into NaN.
sdxl-vae-fp16-fix (whose training code was never released) fine-tuned the codec so its outputs
stay while its activations shrink. Here:

1. :func:`rescale_groupnorm_inputs` makes the GroupNorm case free before training starts: in each
   ResNet block ``conv1`` feeds ``norm2`` and nothing else, and ``GroupNorm(c·h) = GroupNorm(h)``
   up to its eps, so multiplying ``conv1``'s weight and bias by ``c`` < 1 changes no output while
   its activations shrink by ``c``. Blocks whose ``conv1`` peaks above ``bound / 8`` on the sample
   images are brought to ``bound / 8`` (headroom for images larger or brighter than training crops).
2. :class:`BoundedActivations` adds, on every training step, a penalty on the activations no
   rescaling reaches (the residual stream, attention): for every leaf module of the encoder and
   decoder, ``mean(relu(|a| − bound)²) / bound²``. It is zero while all activations are inside the
   bound, so it changes nothing on a codec that is already safe.

The recipe adds the matching of the original codec (the teacher) that keeps the outputs.
"""

from __future__ import annotations

import torch
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from codec.evaluation.activations import leaf_modules

HEADROOM = 8  # rescaled convolutions peak at bound / HEADROOM on the sample images


def groupnorm_fed_convs(vae) -> list[tuple[str, nn.Conv2d]]:
    """(name, conv1) of every ResNet block whose ``conv1`` feeds its GroupNorm ``norm2`` directly:
    without a time embedding (a VAE's blocks have none) diffusers' block computes
    ``norm2(conv1(h))`` unless it scales and shifts by that embedding."""
    return [(f"{name}.conv1", block.conv1) for name, block in vae.named_modules()
            if isinstance(block, ResnetBlock2D) and block.time_emb_proj is None
            and block.time_embedding_norm != "scale_shift" and isinstance(block.norm2, nn.GroupNorm)]


@torch.no_grad()
def conv_peaks(vae, images: list[torch.Tensor], convs: list[tuple[str, nn.Conv2d]]) -> dict[str, float]:
    """The largest |output| of each conv over a round trip (encode, decode of the mean) of each image."""
    peaks = {name: 0.0 for name, _ in convs}

    def hook(name):
        def record(module, inputs, output):
            peaks[name] = max(peaks[name], float(output.detach().abs().amax()))
        return record

    handles = [conv.register_forward_hook(hook(name)) for name, conv in convs]
    try:
        for image in images:
            vae.decode(vae.encode(image[None].float()).latent_dist.mean)
    finally:
        for handle in handles:
            handle.remove()
    return peaks


@torch.no_grad()
def rescale_groupnorm_inputs(vae, images: list[torch.Tensor], bound: float) -> dict[str, float]:
    """Scale down each GroupNorm-fed conv whose output passes ``bound / HEADROOM`` on ``images``
    (in place); returns {conv name: factor applied}. The codec's outputs are unchanged but for
    the GroupNorm's eps, which weighs less as activations stay far above it."""
    convs = groupnorm_fed_convs(vae)
    peaks = conv_peaks(vae, images, convs)
    target = bound / HEADROOM
    factors = {}
    for name, conv in convs:
        if peaks[name] > target:
            factors[name] = target / peaks[name]
            conv.weight.mul_(factors[name])
            if conv.bias is not None:
                conv.bias.mul_(factors[name])
    return factors


class BoundedActivations(nn.Module):
    """The codec in one forward call (for DDP) that also returns the activation penalty and the
    largest |activation| of each half: ``forward(x, z)`` encodes ``x`` and decodes ``z``."""

    def __init__(self, vae, bound: float):
        super().__init__()
        self.vae, self.bound = vae, bound
        self._collected: list | None = None
        self._peaks: dict | None = None
        for half, module in leaf_modules(vae):
            module.register_forward_hook(self._hook(half))

    def _hook(self, half: str):
        def record(module, inputs, output):
            if self._collected is None or not (isinstance(output, torch.Tensor) and output.is_floating_point()):
                return
            magnitude = output.float().abs()
            self._peaks[half] = torch.maximum(self._peaks[half], magnitude.detach().amax())
            self._collected.append((magnitude - self.bound).clamp_min(0).square().mean())
        return record

    def forward(self, x: torch.Tensor, z: torch.Tensor):
        """(posterior of x, decoding of z, penalty, {half: peak tensor})."""
        self._collected = []
        self._peaks = {"encoder": x.new_zeros((), dtype=torch.float32),
                       "decoder": x.new_zeros((), dtype=torch.float32)}
        try:
            posterior = self.vae.encode(x).latent_dist
            decoded = self.vae.decode(z).sample
            penalty = torch.stack(self._collected).sum() / self.bound ** 2
            return posterior, decoded, penalty, self._peaks
        finally:
            self._collected = self._peaks = None

"""Vision foundation models as frozen feature extractors: what VA-VAE (Yao et al. 2025,
"Reconstruction vs. Generation", hustvl/LightningDiT) aligns a codec's latents with, used by the
training loss (``loss.vf_weight``, :mod:`train.autoencoder.vf_loss`) and by ``vae-codec eval
--vf-model`` (:mod:`codec.alignment`).

Every model gives one feature vector per 16×16-pixel token: images (B, 3, H, W) in [-1, 1], H and W
multiples of 16, -> features (B, C, H/16, W/16), in eval mode, frozen, under ``no_grad``.

* ``dinov2-small`` / ``dinov2-base`` (``facebook/dinov2-small`` / ``-base`` on the Hub), any other
  Hub id or local folder of a ``transformers`` DINOv2: the patch tokens of the last layer (after
  its layer norm; the CLS token dropped), the image resized to 14 px per token as the reference
  resizes 256-px images to DINOv2's 224 (bilinear). Needs ``transformers`` (extra ``pipelines``)
  and the weights in the Hub cache or a reachable Hub.
* ``vgg16``: the ImageNet VGG16 that LPIPS uses (real weights found offline,
  :func:`codec.evaluation.lpips_weights.backbone_state_dict`) up to relu5_3: 512 channels at
  stride 16, the image at its own resolution.

Inputs are normalised with ImageNet's mean and std, the inputs both models were trained on (the
reference feeds DINOv2 the VAE's [-1, 1] images as they are).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

TOKEN_SIDE = 16  # pixels per feature token, every model
DINOV2 = {"dinov2-small": "facebook/dinov2-small", "dinov2-base": "facebook/dinov2-base"}
OFFLINE = "vgg16"
NAMES = (*DINOV2, OFFLINE)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VGG16_RELU5_3 = 30  # torchvision vgg16().features[:30]: 13 convs, 4 max-pools (stride 16), relu5_3


class FoundationModelUnavailable(ValueError):
    """A foundation model that cannot be loaded (the message names it and the offline one): a
    setting that cannot be served, so the commands report it in one line."""


class FoundationModel(nn.Module):
    """A frozen feature extractor: images in [-1, 1] -> (B, width, H/16, W/16)."""

    def __init__(self, name: str, net: nn.Module, width: int, patch: int | None):
        super().__init__()
        self.name, self.net, self.width, self.patch = name, net, width, patch  # patch: DINOv2's, None for VGG16
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "FoundationModel":
        return super().train(False)  # always eval mode: no dropout, whatever a caller sets

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The token grid of H×W images; sides that are not multiples of 16 give none (an error)."""
        if height % TOKEN_SIDE or width % TOKEN_SIDE:
            raise ValueError(f"{height}x{width}-px images give no whole token grid of the foundation model "
                             f"{self.name} (one token per {TOKEN_SIDE} px): use sides that are multiples of "
                             f"{TOKEN_SIDE}")
        return height // TOKEN_SIDE, width // TOKEN_SIDE

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        gh, gw = self.grid(*images.shape[-2:])
        x = ((images.float() + 1) / 2 - self.mean) / self.std
        if self.patch is None:  # VGG16: stride 16 at the image's own size
            return self.net(x)
        x = F.interpolate(x, size=(gh * self.patch, gw * self.patch), mode="bilinear", align_corners=False)
        tokens = self.net(pixel_values=x).last_hidden_state[:, 1:]  # (B, 1 + gh*gw, C): CLS dropped
        return tokens.reshape(x.shape[0], gh, gw, -1).permute(0, 3, 1, 2)


def load_foundation(name: str, where: str = "loss.vf_model") -> FoundationModel:
    """``dinov2-small``, ``dinov2-base``, a DINOv2 Hub id or folder, or ``vgg16``; ``where`` names
    the option in errors."""
    if name == OFFLINE:
        return _vgg16()
    return _dinov2(name, where)


def _unavailable(name: str, where: str, why: str) -> FoundationModelUnavailable:
    return FoundationModelUnavailable(
        f"{where}: cannot load the foundation model {name!r}: {why}. Short names: {', '.join(NAMES)}; a DINOv2 "
        f"is loaded from the Hugging Face Hub or its cache (or a local folder). Offline, use {where}={OFFLINE} "
        "(the ImageNet VGG16 that LPIPS uses, whose weights are found without the internet)")


def _dinov2(name: str, where: str) -> FoundationModel:
    source = DINOV2.get(name, name)
    looks_local = source.startswith((".", "/", "~")) or Path(source).expanduser().exists()
    if looks_local and not Path(source).expanduser().is_dir():
        raise _unavailable(name, where, f"no folder {source}")
    try:
        from transformers import AutoConfig, Dinov2Model
    except ImportError as exc:
        raise _unavailable(name, where, f"DINOv2 needs transformers ({exc}); pip install 'vae-codec[pipelines]'") \
            from exc
    location = str(Path(source).expanduser()) if looks_local else source
    try:
        config = AutoConfig.from_pretrained(location)
        if config.model_type != "dinov2":
            raise _unavailable(name, where, f"it is a {config.model_type!r} model, not a DINOv2 (model_type dinov2)")
        net = Dinov2Model.from_pretrained(location)
    except FoundationModelUnavailable:
        raise
    except Exception as exc:  # offline without a cache, a bad id, a folder without weights
        raise _unavailable(name, where, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") \
            from exc
    return FoundationModel(name, net, net.config.hidden_size, net.config.patch_size)


def _vgg16() -> FoundationModel:
    from torchvision.models import vgg16

    from codec.evaluation.lpips_weights import backbone_state_dict

    features, _ = backbone_state_dict("vgg")
    with torch.random.fork_rng(devices=[]):  # its random init (overwritten) must not move the caller's RNG
        net = vgg16().features[:VGG16_RELU5_3]
    # The 13 convs' weights and biases: every parameter gets one (strict), and none is left over.
    net.load_state_dict({k.removeprefix("features."): v for k, v in features.items()}, strict=True)
    return FoundationModel(OFFLINE, net, 512, None)


def match_grid(latents: torch.Tensor, grid: tuple[int, int], name: str = "the foundation model") -> torch.Tensor:
    """Latents (B, C, h, w) resized (bilinear, as the reference) to the token grid, which must
    divide the latent grid: one token per whole block of latent positions."""
    h, w = latents.shape[-2:]
    if h % grid[0] or w % grid[1]:
        raise ValueError(f"the token grid {grid[0]}x{grid[1]} of {name} cannot be matched to the {h}x{w} latent "
                         "grid (it must divide it: one token per 16 px, one latent per 8 px): use image sides "
                         "that are multiples of 16")
    if (h, w) == tuple(grid):
        return latents
    return F.interpolate(latents, size=tuple(grid), mode="bilinear", align_corners=False)

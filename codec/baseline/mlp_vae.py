"""``MLPVAE``: the vanilla variational autoencoder of Kingma & Welling (2013), as a baseline.

An MLP encoder maps a flattened image to the posterior q(z|x) = N(mu, diag(sigma^2)); an MLP
decoder maps z to the parameters of p(x|z): Bernoulli logits (binarised or continuous targets
in [0, 1]) or a Gaussian mean and log-variance per pixel. With ``num_classes > 0`` it is a
conditional VAE (Sohn et al. 2015): a one-hot label is concatenated to the encoder's input
and to z before decoding.

It mirrors ``diffusers.AutoencoderKL`` so ``Codec``, the trainer and export treat both alike:
``encode(x).latent_dist`` is a diagonal Gaussian posterior, ``decode(z).sample`` an image in
[-1, 1], ``config.scaling_factor`` / ``shift_factor`` live in ``config.json`` and
``save_pretrained`` writes ``config.json`` + ``diffusion_pytorch_model.safetensors``.
Images are (B, C, H, W) in [-1, 1] like everywhere else; latents are flat, (B, latent_size).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

LIKELIHOODS = ("bernoulli", "gaussian")
# Bounds of the Gaussian decoder's log-variance: without them a pixel that is always 0 (MNIST's
# border) drives its variance to zero and its log-density to +inf.
GAUSSIAN_LOGVAR_RANGE = (-9.0, 4.0)


class FlatGaussian(DiagonalGaussianDistribution):
    """diffusers' posterior for flat (B, D) latents: its ``kl``/``nll`` sum over dims 1..3."""

    def kl(self, other=None) -> torch.Tensor:
        """KL(q || N(0, I)) per example, in closed form (Kingma & Welling, appendix B)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).flatten(1).sum(1)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z|x) per example; ``z`` may carry leading sample dims: (K, B, D) -> (K, B)."""
        return -0.5 * (math.log(2 * math.pi) + self.logvar + (z - self.mean).pow(2) / self.var).sum(-1)


def _mlp(sizes: list[int], activation: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), activation()]
    return nn.Sequential(*layers)


class MLPVAE(ModelMixin, ConfigMixin):
    """Vanilla VAE with MLP encoder/decoder (see the module docstring)."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        image_size: int = 28,
        in_channels: int = 1,
        hidden_sizes: tuple[int, ...] = (500, 500),
        latent_size: int = 50,
        likelihood: str = "bernoulli",
        num_classes: int = 0,
        activation: str = "tanh",
        scaling_factor: float = 1.0,
        shift_factor: float | None = None,
    ):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood: unknown {likelihood!r}; choose from {list(LIKELIHOODS)}")
        acts = {"tanh": nn.Tanh, "relu": nn.ReLU, "softplus": nn.Softplus, "silu": nn.SiLU}
        if activation not in acts:
            raise ValueError(f"activation: unknown {activation!r}; choose from {sorted(acts)}")
        if latent_size < 1 or image_size < 1 or in_channels not in (1, 3):
            raise ValueError(
                f"need latent_size >= 1, image_size >= 1 and in_channels 1 or 3; got "
                f"{latent_size}, {image_size}, {in_channels}"
            )
        hidden = list(hidden_sizes)
        pixels = in_channels * image_size * image_size
        self.encoder = _mlp([pixels + num_classes, *hidden], acts[activation])
        self.to_posterior = nn.Linear(hidden[-1] if hidden else pixels + num_classes, 2 * latent_size)
        self.decoder = _mlp([latent_size + num_classes, *reversed(hidden)], acts[activation])
        out = pixels * (2 if likelihood == "gaussian" else 1)
        self.to_pixels = nn.Linear(hidden[0] if hidden else latent_size + num_classes, out)

    # ------------------------------------------------------------------ shapes
    @property
    def num_pixels(self) -> int:
        c = self.config
        return c.in_channels * c.image_size * c.image_size

    def latent_shape(self) -> tuple[int]:
        return (self.config.latent_size,)

    def fit_images(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images from ``codec.images`` -> this model's channels, size checked."""
        s = self.config.image_size
        if tuple(x.shape[-2:]) != (s, s):
            raise ValueError(
                f"this MLP VAE takes {s}x{s} images, got {x.shape[-2]}x{x.shape[-1]}; resize or crop first"
            )
        if self.config.in_channels == 1 and x.shape[1] == 3:
            x = x.mean(1, keepdim=True)  # greyscale models read RGB files as grey (equal channels)
        return x

    def _with_label(self, h: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        k = self.config.num_classes
        if k == 0:
            if labels is not None:
                raise ValueError("labels were given to an unconditional MLPVAE (num_classes=0)")
            return h
        if labels is None:
            raise ValueError(f"this conditional MLPVAE needs labels (integers in [0, {k}))")
        labels = torch.as_tensor(labels, device=h.device).long().reshape(-1)
        if labels.numel() == 1 and h.shape[0] > 1:
            labels = labels.expand(h.shape[0])
        if labels.shape[0] != h.shape[0] or labels.min() < 0 or labels.max() >= k:
            raise ValueError(f"labels must be {h.shape[0]} integers in [0, {k}), got {labels.tolist()}")
        return torch.cat([h, F.one_hot(labels, k).to(h.dtype)], dim=1)

    # ------------------------------------------------------------------ the AutoencoderKL interface
    def encode(self, x: torch.Tensor, labels=None, return_dict: bool = True):
        """Images (B, C, H, W) in [-1, 1] -> ``AutoencoderKLOutput(latent_dist=FlatGaussian)``."""
        h = self._with_label(x.flatten(1), labels)
        posterior = FlatGaussian(self.to_posterior(self.encoder(h)))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decoder_params(self, z: torch.Tensor, labels=None) -> torch.Tensor:
        """z (..., D) -> Bernoulli logits (..., P) or Gaussian [mean, logvar] (..., 2P), in [0, 1] units."""
        lead = z.shape[:-1]
        z = z.reshape(-1, z.shape[-1])
        if labels is not None and len(lead) == 2:  # (K, B, D) samples: repeat labels per sample
            labels = torch.as_tensor(labels, device=z.device).reshape(1, -1).expand(lead[0], -1)
        out = self.to_pixels(self.decoder(self._with_label(z, labels)))
        return out.reshape(*lead, -1)

    def mean_image(self, params: torch.Tensor) -> torch.Tensor:
        """Decoder parameters -> expected image, (..., P) in [0, 1]."""
        if self.config.likelihood == "bernoulli":
            return torch.sigmoid(params)
        return params[..., : self.num_pixels].clamp(0, 1)

    def log_likelihood(self, params: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """log p(x|z) summed over pixels; ``target`` (B, P) in [0, 1]; params may have a leading K."""
        if self.config.likelihood == "bernoulli":
            # Cross-entropy with logits; continuous targets in [0, 1] are allowed (the common
            # "Bernoulli on grey levels" of the VAE literature; not a normalised density then).
            target = target.expand_as(params)
            return -F.binary_cross_entropy_with_logits(params, target, reduction="none").sum(-1)
        mean, logvar = params.split(self.num_pixels, dim=-1)
        logvar = logvar.clamp(*GAUSSIAN_LOGVAR_RANGE)
        return -0.5 * (math.log(2 * math.pi) + logvar + (target - mean).pow(2) / logvar.exp()).sum(-1)

    def decode(self, z: torch.Tensor, labels=None, return_dict: bool = True):
        """Latents (B, D) -> ``DecoderOutput(sample=(B, C, H, W) in [-1, 1])``: the decoder's mean."""
        c = self.config
        image = self.mean_image(self.decoder_params(z, labels)) * 2 - 1
        image = image.reshape(z.shape[0], c.in_channels, c.image_size, c.image_size)
        return DecoderOutput(sample=image) if return_dict else (image,)

    def forward(self, x: torch.Tensor, labels=None, sample_posterior: bool = True, generator=None):
        posterior = self.encode(x, labels).latent_dist
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, labels)

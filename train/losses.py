"""The latent-diffusion autoencoder loss (CompVis ``LPIPSWithDiscriminator``, Rombach et al. 2022):

    rec  = |x - x̂|  (or (x - x̂)²)  + perceptual_weight · LPIPS(x, x̂)
    nll  = Σ (rec / exp(logvar) + logvar) / B
    kl   = Σ KL(q(z|x) || N(0, I)) / B
    G    = nll + kl_weight · kl + d_weight · disc_factor · (-mean D(x̂))
    D    = ½ (mean relu(1 - D(x)) + mean relu(1 + D(x̂.detach())))           (hinge)
    d_weight = ‖∇_L nll‖ / (‖∇_L g‖ + 1e-4), clamped to [0, 1e4], × disc_weight,
               L = the decoder's last conv weight; only computed once the discriminator is on.
    EQ     = the rec term of (τ(x), D(τ(z))) per image (EQ-VAE; :meth:`GeneratorLoss.reconstruction`),
             added × equivariance_weight by the kl-f8 recipe.

Every function returns ``(loss, logs)`` with plain floats in ``logs``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.config import LossConfig

LPIPS_MIN_SIDE = 32  # smaller images are too small for LPIPS-AlexNet's pooling (VGG takes 16)


class LogVar(nn.Module):
    """The scalar ``logvar``; a module of its own so checkpoints hold it without LPIPS."""

    def __init__(self, init: float, learn: bool):
        super().__init__()
        # Only optimised when learn_logvar is on (LDM declared it learnable but never trained it).
        self.value = nn.Parameter(torch.tensor(float(init)), requires_grad=learn)


class GeneratorLoss:
    """Reconstruction + LPIPS + KL (+ adversarial) for the autoencoder."""

    def __init__(self, cfg: LossConfig, lpips_model: nn.Module | None):
        if cfg.perceptual_weight > 0 and lpips_model is None:
            raise ValueError("perceptual_weight > 0 needs an LPIPS model")
        self.cfg = cfg
        self.lpips = lpips_model
        self.logvar_state = LogVar(cfg.logvar_init, cfg.learn_logvar)

    @property
    def logvar(self) -> nn.Parameter:
        return self.logvar_state.value

    def to(self, device) -> "GeneratorLoss":
        self.logvar_state.to(device)
        if self.lpips is not None:
            self.lpips.to(device)
        return self

    def __call__(
        self,
        x: torch.Tensor,
        recon: torch.Tensor,
        posterior,
        step: int,
        disc: nn.Module | None = None,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        batch = x.shape[0]
        x, recon = x.float(), recon.float()
        pixel = (x - recon).abs() if cfg.reconstruction == "l1" else (x - recon).pow(2)
        rec = pixel
        logs = {"rec": pixel.mean().item()}
        if self.lpips is not None and cfg.perceptual_weight > 0 and step >= cfg.perceptual_start:
            # No torch.no_grad here: the perceptual term must send gradients to the decoder.
            p = self.lpips(x, recon)  # (B, 1, 1, 1), broadcast over pixels as in the reference
            rec = rec + cfg.perceptual_weight * p
            logs["lpips"] = p.mean().item()
        nll = (rec / torch.exp(self.logvar) + self.logvar).sum() / batch
        kl = posterior.kl().sum() / batch
        loss = nll + cfg.kl_weight * kl
        logs.update(nll=nll.item(), kl=kl.item() / posterior.mean[0].numel(), logvar=self.logvar.item())

        factor = disc_factor(cfg, step)
        if disc is not None and factor > 0:
            g_loss = -disc(recon).mean()
            d_weight = adaptive_weight(nll, g_loss, last_layer) * cfg.disc_weight
            loss = loss + d_weight * factor * g_loss
            logs.update(g_loss=g_loss.item(), d_weight=d_weight.item())
        logs["disc_factor"] = factor
        logs["loss"] = loss.item()
        return loss, logs


    def reconstruction(self, x: torch.Tensor, recon: torch.Tensor, step: int, per_image: int) -> torch.Tensor:
        """The pixel + LPIPS term for another pair (EQ-VAE's τ(x) and D(τ(z))), summed per image
        like ``nll`` as if it had ``per_image`` elements, so that both weigh alike whatever the
        transform's size (logvar is left out: it is 0 unless learned). LPIPS joins where the pair
        is at least ``LPIPS_MIN_SIDE`` pixels on a side (AlexNet's pooling needs that much)."""
        cfg = self.cfg
        x, recon = x.float(), recon.float()
        rec = (x - recon).abs() if cfg.reconstruction == "l1" else (x - recon).pow(2)
        big_enough = min(x.shape[-2:]) >= LPIPS_MIN_SIDE
        if self.lpips is not None and cfg.perceptual_weight > 0 and step >= cfg.perceptual_start and big_enough:
            rec = rec + cfg.perceptual_weight * self.lpips(x, recon)
        return rec.mean() * per_image


def disc_factor(cfg: LossConfig, step: int) -> float:
    """0 until ``disc_start`` (or when the discriminator is off), then ``cfg.disc_factor``."""
    return cfg.disc_factor if cfg.disc_weight > 0 and step >= cfg.disc_start else 0.0


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """Balance the GAN gradient against the reconstruction gradient at the last decoder layer."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, 1e4).detach()


def discriminator_loss(
    disc: nn.Module, x: torch.Tensor, recon: torch.Tensor, factor: float
) -> tuple[torch.Tensor, dict]:
    """Hinge loss; ``recon`` is detached so no gradient reaches the autoencoder."""
    logits_real = disc(x.detach())
    logits_fake = disc(recon.detach())
    loss = 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    logs = {
        "d_loss": loss.item(),
        "logits_real": logits_real.mean().item(),
        "logits_fake": logits_fake.mean().item(),
    }
    return factor * loss, logs

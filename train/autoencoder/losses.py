"""The latent-diffusion autoencoder loss (CompVis ``LPIPSWithDiscriminator``, Rombach et al. 2022):

    rec  = |x - x̂|  (or (x - x̂)²)  + perceptual_weight · LPIPS(x, x̂)
    nll  = Σ (rec / exp(logvar) + logvar) / B
    kl   = Σ KL(q(z|x) || N(0, I)) / B
    G    = nll + kl_weight · kl + d_weight · disc_factor · (-mean D(x̂))
    D    = ½ (mean relu(1 - D(x)) + mean relu(1 + D(x̂.detach())))           (hinge)
    d_weight = ‖∇_L nll‖ / (‖∇_L g‖ + 1e-4), clamped to [0, 1e4], × disc_weight,
               L = the decoder's last conv weight; only computed once the discriminator is on.
    EQ     = the rec term of (τ(x), D(τ(z))) per image (EQ-VAE's additive mode;
             :meth:`GeneratorLoss.reconstruction`), added × equivariance_weight by the kl-f8 recipe.
             (The published mode takes the whole loss above on a transformed pair instead:
             :mod:`train.autoencoder.eq_vae`.)
    VF     = vf_weight · w · (cosine + distance term) of the projected latents against a frozen
             foundation model's features, w = ‖∇_E nll‖ / (‖∇_E vf‖ + 1e-4) at the encoder's last
             conv E (VA-VAE; :mod:`train.autoencoder.vf_loss`), added to G beside the KL term.

Every function returns ``(loss, logs)`` with plain floats in ``logs``.

Once the discriminator is on, ``G``'s gradient is assembled at the reconstruction x̂ (see
:func:`adversarial_loss`): ∂nll/∂x̂ and ∂g/∂x̂ are taken once each, which is one backward through
LPIPS' VGG and one through the discriminator instead of the reference's two each (its
``autograd.grad`` for ∇_L, then the full backward again); ∇_L nll and ∇_L g follow from them
through the last conv alone. The returned loss has G's value and exactly G's gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.autoencoder.config import LossConfig

LPIPS_MIN_SIDE = 32  # smaller images are too small for LPIPS-AlexNet's pooling (VGG takes 16)


class LogVar(nn.Module):
    """The scalar ``logvar``; a module of its own so checkpoints hold it without LPIPS."""

    def __init__(self, init: float, learn: bool):
        super().__init__()
        # Only optimised when learn_logvar is on (LDM declared it learnable but never trained it).
        self.value = nn.Parameter(torch.tensor(float(init)), requires_grad=learn)


class GeneratorLoss:
    """Reconstruction + LPIPS + KL (+ adversarial) for the autoencoder."""

    def __init__(self, cfg: LossConfig, lpips_model: nn.Module | None, vf=None):
        """``vf``: VA-VAE's alignment term (train.autoencoder.vf_loss.VFLoss), None when off."""
        if cfg.perceptual_weight > 0 and lpips_model is None:
            raise ValueError("perceptual_weight > 0 needs an LPIPS model")
        if (cfg.vf_weight > 0) != (vf is not None):
            raise ValueError("loss.vf_weight > 0 needs a VFLoss, and a VFLoss needs loss.vf_weight > 0")
        self.cfg = cfg
        self.vf = vf
        # Channels-last: oneDNN runs LPIPS' VGG forward and backward ~18 % faster on channels-last
        # tensors than on NCHW ones (CPU, batch 4, 128², one thread); the values are the same.
        self.lpips = lpips_model.to(memory_format=torch.channels_last) if lpips_model is not None else None
        self.logvar_state = LogVar(cfg.logvar_init, cfg.learn_logvar)

    @property
    def logvar(self) -> nn.Parameter:
        return self.logvar_state.value

    def to(self, device) -> "GeneratorLoss":
        self.logvar_state.to(device)
        if self.vf is not None:
            self.vf.to(device)
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
        grad_scale: torch.Tensor | None = None,
        projected: torch.Tensor | None = None,
        encoder_last: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """``grad_scale``: fp16's loss scale as a tensor (:func:`loss_scale`), which
        the backward of the returned loss will be multiplied by; None without loss scaling.
        ``projected``: the VF projector's output for the sampled latents of ``x`` and
        ``encoder_last`` the layer its adaptive weight is taken at (the VF loss only)."""
        batch, recon = x.shape[0], recon.float()
        rec, logs = self.reconstruction_terms(x, recon, step)
        nll = (rec / torch.exp(self.logvar) + self.logvar).sum() / batch
        kl = posterior.kl().sum() / batch
        kl_term = self.cfg.kl_weight * kl
        logs.update(nll=nll.item(), kl=kl.item() / posterior.mean[0].numel(), logvar=self.logvar.item())
        other = kl_term  # the terms that reach the model other than through x̂
        if self.vf is not None:  # before the GAN term: adversarial_loss frees nll's graph
            vf, vf_logs = self.vf(x, projected)
            vf_weight = self.vf.weight(nll, vf, encoder_last, grad_scale)
            other = other + vf_weight * vf
            logs.update(vf_logs, vf_weight=vf_weight.item())
        return self.with_adversarial(nll, other, recon, step, disc, last_layer, grad_scale, logs)

    def reconstruction_terms(self, target: torch.Tensor, recon: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        """Pixel error + ``perceptual_weight`` · LPIPS (broadcast over each image's pixels, as in
        the reference) per element, in float32, and their logged means."""
        target, recon = target.float(), recon.float()
        rec = self.pixel_error(target, recon)
        logs = {"rec": rec.mean().item()}
        if self.perceptual_on(step):
            p = self.perceptual(target, recon)  # (B, 1, 1, 1)
            rec = rec + self.cfg.perceptual_weight * p
            logs["lpips"] = p.mean().item()
        return rec, logs

    def with_adversarial(self, base: torch.Tensor, other: torch.Tensor, recon: torch.Tensor, step: int,
                         disc: nn.Module | None, last_layer: torch.Tensor | None, grad_scale: torch.Tensor | None,
                         logs: dict) -> tuple[torch.Tensor, dict]:
        """``base + other``, plus the GAN term once on, weighted adaptively against ``base``'s
        gradient at ``last_layer`` (:func:`adversarial_loss`); logs its terms and the loss."""
        cfg = self.cfg
        factor = disc_factor(cfg, step)
        if disc is not None and factor > 0:
            g_loss = -disc(recon).mean()
            loss, value, d_weight = adversarial_loss(base, other, g_loss, recon, last_layer, self.logvar,
                                                     cfg.disc_weight, factor, grad_scale)
            logs.update(g_loss=g_loss.item(), d_weight=d_weight.item())
        else:
            loss = value = base + other
        logs["disc_factor"] = factor
        logs["loss"] = value.item()
        return loss, logs

    def pixel_error(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """|x - x̂| or (x - x̂)² per element (``loss.reconstruction``)."""
        return (x - recon).abs() if self.cfg.reconstruction == "l1" else (x - recon).pow(2)

    def perceptual_on(self, step: int) -> bool:
        """Whether LPIPS is part of the reconstruction term at ``step``."""
        cfg = self.cfg
        return self.lpips is not None and cfg.perceptual_weight > 0 and step >= cfg.perceptual_start

    def perceptual(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """LPIPS per image, (B, 1, 1, 1). No torch.no_grad: it must send gradients to the decoder.
        Channels-last tensors: VGG's convolutions run faster so on CPUs."""
        cl = torch.channels_last
        return self.lpips(x.contiguous(memory_format=cl), recon.contiguous(memory_format=cl))

    def reconstruction(self, x: torch.Tensor, recon: torch.Tensor, step: int, per_image: int) -> torch.Tensor:
        """The pixel + LPIPS term for another pair (EQ-VAE's τ(x) and D(τ(z))), summed per image
        like ``nll`` as if it had ``per_image`` elements, so that both weigh alike whatever the
        transform's size (logvar is left out: it is 0 unless learned). LPIPS joins where the pair
        is at least ``LPIPS_MIN_SIDE`` pixels on a side (AlexNet's pooling needs that much)."""
        x, recon = x.float(), recon.float()
        rec = self.pixel_error(x, recon)
        if self.perceptual_on(step) and min(x.shape[-2:]) >= LPIPS_MIN_SIDE:
            rec = rec + self.cfg.perceptual_weight * self.perceptual(x, recon)
        return rec.mean() * per_image


def disc_factor(cfg: LossConfig, step: int) -> float:
    """0 until ``disc_start`` (or when the discriminator is off), then ``cfg.disc_factor``."""
    return cfg.disc_factor if cfg.disc_weight > 0 and step >= cfg.disc_start else 0.0


def adaptive_weight(nll_grad: torch.Tensor, g_grad: torch.Tensor, eps: float | torch.Tensor = 1e-4,
                    limit: float = 1e4) -> torch.Tensor:
    """Balance the GAN gradient against the reconstruction gradient at the last decoder layer,
    from those two gradients (``eps`` scales with them where they carry fp16's loss scale); the
    VF loss does the same at the encoder's last layer, clamped to ``limit`` 1e8 instead of 1e4."""
    weight = nll_grad.norm() / (g_grad.norm() + eps)
    return weight.clamp(0.0, limit).detach()


def adversarial_loss(
    nll: torch.Tensor,
    kl_term: torch.Tensor,
    g_loss: torch.Tensor,
    recon: torch.Tensor,
    last_layer: torch.Tensor,
    logvar: torch.Tensor,
    disc_weight: float,
    factor: float,
    grad_scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, value, d_weight)``: ``loss`` has the value ``value`` = nll + kl_term + d_weight ·
    factor · g_loss (detached) and exactly its gradient, for one backward through LPIPS and one
    through the discriminator.

    ``nll`` reaches the autoencoder only through ``recon`` (and the learned ``logvar``), ``g_loss``
    only through ``recon``: so ∂nll/∂recon and ∂g/∂recon, taken once each, give the reference's
    last-layer gradients (through the last conv alone: ``recon`` is its output for kl-f8, and
    ``2 · output − 1`` for AutoencoderTiny students) and,
    combined, the whole backward. The returned tensor is ``value + (s - s.detach())`` with
    ``s = Σ recon · ∂G/∂recon + kl_term (+ logvar · ∂nll/∂logvar)``: G's value, G's gradient.

    Under fp16 the two backwards run on losses multiplied by ``grad_scale`` (unscaled, LPIPS'
    fp16 gradients could underflow) and ``s`` is divided by it again, since accelerate's backward
    multiplies the returned loss by the scale (a power of two: exact in fp32). Where the scaled
    gradients overflow, the GradScaler skips the step and lowers the scale, as it does for the
    reference's scaled backward; ``value`` stays finite then (d_weight taken as 0 if NaN), so that
    the overflow is not also counted as a non-finite loss (``loss`` itself may be NaN).
    """
    scale = grad_scale if grad_scale is not None else 1.0
    learn_logvar = logvar.requires_grad
    # No retain_graph: LPIPS' and the discriminator's graphs are not needed again.
    nll_grads = torch.autograd.grad(nll * scale, [recon, logvar] if learn_logvar else [recon])
    (g_grad,) = torch.autograd.grad(g_loss * scale, recon)
    nll_last = torch.autograd.grad(recon, last_layer, nll_grads[0], retain_graph=True)[0]
    g_last = torch.autograd.grad(recon, last_layer, g_grad, retain_graph=True)[0]
    d_weight = adaptive_weight(nll_last, g_last, 1e-4 * scale) * disc_weight
    if grad_scale is not None:
        d_weight = torch.nan_to_num(d_weight, nan=0.0)  # inf/inf from an overflow (see above)
    value = (nll + kl_term + d_weight * factor * g_loss).detach()  # the reference's order of sums
    surrogate = (recon * ((nll_grads[0] + d_weight * factor * g_grad) / scale)).sum() + kl_term
    if learn_logvar:
        surrogate = surrogate + logvar * (nll_grads[1] / scale)
    return value + (surrogate - surrogate.detach()), value, d_weight


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


def loss_scale(accelerator) -> torch.Tensor | None:
    """fp16's current loss scale as a tensor (read without a device sync), or None without a scaler."""
    scaler = accelerator.scaler
    return scaler.scale(torch.ones((), device=accelerator.device)) if scaler is not None else None


class frozen:
    """Temporarily set ``requires_grad=False`` on a module's parameters (None is a no-op)."""

    def __init__(self, module: nn.Module | None):
        self.module = module

    def __enter__(self):
        if self.module is not None:
            self.module.requires_grad_(False)

    def __exit__(self, *exc):
        if self.module is not None:
            self.module.requires_grad_(True)

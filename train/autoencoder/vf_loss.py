"""VA-VAE's vision-foundation (VF) loss (Yao et al. 2025, "Reconstruction vs. Generation: Taming
Optimization Dilemma in Latent Diffusion Models"; hustvl/LightningDiT
``vavae/ldm/modules/losses/contperceptual.py``, ``vf_loss_type: combined_v3``):

    z' = P z                      P a 1×1 conv (no bias) to the foundation model's width, z the
                                  posterior sample; z' resized (bilinear) to the token grid
    vf = cosine term + distance term of (z', f)   (:mod:`codec.alignment`; f = features of x,
                                  frozen model, eval mode, no_grad, once per step)
    w  = ‖∇_E nll‖ / (‖∇_E vf‖ + 1e-4), clamped to [0, 1e8], detached; E = the encoder's last conv
    G += vf_weight · w · vf       (w = 1 with ``vf_adaptive: false``)

P lives in the kl-f8 recipe's wrapped model (:class:`train.autoencoder.recipes.klf8.Autoencoder`),
so DDP averages its gradients, the optimiser trains it, checkpoints hold it, and the export (the
``AutoencoderKL`` alone) leaves it out.

Where this differs from the reference: its adaptive factor comes from the GAN's
``calculate_adaptive_weight``, which also multiplies by ``disc_weight`` (0.5 in its configs, so
its effective weight is 0.05 · w); here ``vf_weight`` alone scales it (set 0.05 to match). Its
VAE is f16 (latent grid = DINOv2's 16×16 at 256 px); a kl-f8 latent has twice the grid, so z' is
resized to the tokens. Its DINOv2 sees the [-1, 1] images unnormalised; here ImageNet-normalised.
"""

from __future__ import annotations

import torch
from torch import nn

from codec.alignment import cosine_term, distance_term
from codec.foundation import load_foundation, match_grid
from train.autoencoder.config import LossConfig
from train.autoencoder.losses import adaptive_weight

VF_WEIGHT_LIMIT = 1e8  # the reference's clamp (the GAN's is 1e4)


class VFLoss:
    """The frozen foundation model and the two terms against projected latents."""

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg
        self.foundation = load_foundation(cfg.vf_model)

    def to(self, device) -> "VFLoss":
        self.foundation.to(device)
        return self

    def projector(self, latent_channels: int) -> nn.Conv2d:
        """The trained 1×1 map from the latents to the features (the reference's ``linear_proj``)."""
        return nn.Conv2d(latent_channels, self.foundation.width, kernel_size=1, bias=False)

    def __call__(self, x: torch.Tensor, projected: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(cosine + distance term, their logged values) of the images ``x`` and their projected latents."""
        features = self.foundation(x).float()  # (B, C, H/16, W/16), no_grad inside
        projected = match_grid(projected.float(), features.shape[-2:], self.cfg.vf_model)
        cos = cosine_term(projected, features, self.cfg.vf_margin_cos)
        distance = distance_term(projected, features, self.cfg.vf_margin_distance)
        return cos + distance, {"vf_cos": cos.item(), "vf_distance": distance.item()}

    def weight(self, nll: torch.Tensor, vf: torch.Tensor, encoder_last: torch.Tensor,
               grad_scale: torch.Tensor | None) -> torch.Tensor:
        """``vf_weight`` × the adaptive factor at the encoder's last layer (a detached scalar).
        Both gradients keep their graphs: the loss's backward still needs them. Under fp16 they
        are taken of losses × ``grad_scale`` (as :func:`train.autoencoder.losses.adversarial_loss`)."""
        if not self.cfg.vf_adaptive:
            return torch.tensor(self.cfg.vf_weight, device=vf.device)
        scale = grad_scale if grad_scale is not None else 1.0
        (nll_grad,) = torch.autograd.grad(nll * scale, encoder_last, retain_graph=True)
        (vf_grad,) = torch.autograd.grad(vf * scale, encoder_last, retain_graph=True)
        factor = adaptive_weight(nll_grad, vf_grad, 1e-4 * scale, limit=VF_WEIGHT_LIMIT)
        if grad_scale is not None:
            factor = torch.nan_to_num(factor, nan=0.0)  # inf/inf from an fp16 overflow: the scaler skips the step
        return factor * self.cfg.vf_weight


def check_resumable(checkpoint, projector: nn.Module | None) -> None:
    """Refuse to resume a checkpoint whose VF projector (or its absence) differs from this run's:
    accelerate would otherwise fail on a missing or unexpected ``projector.weight`` with a traceback."""
    from pathlib import Path

    from safetensors import safe_open

    weights = Path(checkpoint) / "model.safetensors"  # accelerate's file of the first prepared model
    if not weights.exists():
        return
    with safe_open(str(weights), "pt") as f:
        saved = tuple(f.get_slice("projector.weight").get_shape()) if "projector.weight" in f.keys() else None
    now = tuple(projector.weight.shape) if projector is not None else None
    if saved != now:
        describe = lambda shape: "no VF loss" if shape is None else f"a VF projector to {shape[0]} channels"  # noqa: E731
        raise ValueError(f"cannot resume from {checkpoint}: it was trained with {describe(saved)}, this run has "
                         f"{describe(now)}; resume with that run's loss.vf_weight and loss.vf_model, or start a "
                         "new output_dir")

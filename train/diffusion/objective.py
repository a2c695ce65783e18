"""The training objective of ``python -m train.ldm``: DDPM (epsilon or v prediction) or rectified
flow, with classifier-free label dropout."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.diffusion.config import LDMConfig


def diffusion_loss(cfg: LDMConfig, unet, noise_scheduler, accelerator, batch, conditional: bool,
                   num_classes: int) -> torch.Tensor:
    """The objective on one batch: noise the latents at random times (DDPM) or positions on the
    straight path (flow), predict epsilon / v / the velocity, mean squared error. Labels are
    replaced by the null class with probability ``class_dropout`` (classifier-free guidance)."""
    x0, labels = batch if conditional else (batch, None)
    x0 = x0.to(accelerator.device, non_blocking=True)
    if labels is not None:
        labels = labels.to(accelerator.device)
        dropped = torch.rand(labels.shape, device=labels.device) < cfg.class_dropout
        labels = torch.where(dropped, torch.full_like(labels, num_classes), labels)
    noise = torch.randn_like(x0)
    T = noise_scheduler.config.num_train_timesteps
    if cfg.objective == "flow":  # rectified flow: x_t = (1 - s) x0 + s noise, predict noise - x0
        sigma = torch.rand(x0.shape[0], device=x0.device)
        s4 = sigma.view(-1, 1, 1, 1)
        noisy, target, t = (1 - s4) * x0 + s4 * noise, noise - x0, sigma * T
    else:
        t = torch.randint(0, T, (x0.shape[0],), device=x0.device)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        target = noise if cfg.prediction_type == "epsilon" else noise_scheduler.get_velocity(x0, noise, t)
    with accelerator.autocast():
        pred = unet(noisy, t, class_labels=labels).sample
    return F.mse_loss(pred.float(), target.float())

"""What the model kind decides, chosen once per run (:func:`recipe_for`) so the loop has no
``if mlp`` branches: the network, its data, its loss, and what a logged reconstruction shows.

* ``kl-f8``: :class:`~train.autoencoder.recipes.klf8.KLF8Recipe`, the convolutional
  ``AutoencoderKL`` with reconstruction + LPIPS + KL (+ PatchGAN, + EQ-VAE);
* ``mlp-vae``: :class:`~train.autoencoder.recipes.mlp_vae.MLPRecipe`, the vanilla VAE and its ELBO;
* ``autoencoder-tiny``: :class:`~train.autoencoder.recipes.student.DistillRecipe`, an
  ``AutoencoderTiny`` student of a teacher codec.

A recipe's ``loss(ctx, x, batch)`` sees a :class:`StepContext` (the model, its losses and the
step), never the loop's whole state, and returns a :class:`StepResult` with everything the loop
needs next, the discriminator's real images included.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class StepContext:
    """What a recipe's loss sees of one optimiser step."""

    model: nn.Module  # the prepared model (DDP where several processes): call it for the forward
    raw_model: nn.Module  # the plain model inside it (read its config, its helpers)
    step: int
    rank: int  # this process's index (per-process randomness, e.g. EQ-VAE's transform)
    gen_loss: object  # train.autoencoder.losses.GeneratorLoss: the terms every recipe shares
    disc: nn.Module | None  # the plain discriminator, None when off
    last_layer: torch.Tensor | None  # where the adaptive GAN weight balances gradients
    grad_scale: torch.Tensor | None  # fp16's loss scale (train.autoencoder.losses.loss_scale)
    encoder_last_layer: torch.Tensor | None = None  # where the VF loss's adaptive weight balances gradients


@dataclass
class StepResult:
    """What a recipe's loss gives back to the loop."""

    fake: torch.Tensor  # the reconstructions: logged in grids, judged by the discriminator
    loss: torch.Tensor
    logs: dict  # floats, "loss" among them
    real: torch.Tensor  # what the discriminator is shown as real (the images, or a teacher's)
    shown_against: torch.Tensor | None = None  # what the logged grid compares ``fake`` with, if not the inputs


# model.kind -> (module, class); imported when chosen, so a run loads only its own recipe
RECIPES = {
    "kl-f8": ("train.autoencoder.recipes.klf8", "KLF8Recipe"),
    "mlp-vae": ("train.autoencoder.recipes.mlp_vae", "MLPRecipe"),
    "autoencoder-tiny": ("train.autoencoder.recipes.student", "DistillRecipe"),
}


def recipe_for(cfg):
    """The recipe of ``cfg.model.kind`` (checked by ``train.autoencoder.config.validate``); a kl-f8
    fine-tune with ``fp16_safe.bound`` > 0 is :class:`~train.autoencoder.recipes.fp16_safe.FP16SafeRecipe`."""
    module, name = (("train.autoencoder.recipes.fp16_safe", "FP16SafeRecipe") if cfg.fp16_safe.bound > 0
                    else RECIPES[cfg.model.kind])
    return getattr(importlib.import_module(module), name)(cfg)

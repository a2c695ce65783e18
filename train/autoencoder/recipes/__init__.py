"""What the model kind decides, chosen once per run (:func:`recipe_for`) so the loop has no
``if mlp`` branches: the network, its data, its loss, and what a logged reconstruction shows.

* ``kl-f8``: :class:`~train.autoencoder.recipes.klf8.KLF8Recipe`, the convolutional
  ``AutoencoderKL`` with reconstruction + LPIPS + KL (+ PatchGAN, + EQ-VAE);
* ``mlp-vae``: :class:`~train.autoencoder.recipes.mlp_vae.MLPRecipe`, the vanilla VAE and its ELBO;
* ``autoencoder-tiny``: :class:`~train.autoencoder.recipes.student.DistillRecipe`, an
  ``AutoencoderTiny`` student of a teacher codec.

A recipe's ``loss(step, x, batch)`` sees a :class:`~train.autoencoder.recipes.klf8.StepContext`
(the model, its losses and the step), never the loop's whole state.
"""

from __future__ import annotations

import importlib

# model.kind -> (module, class); imported when chosen, so a run loads only its own recipe
RECIPES = {
    "kl-f8": ("train.autoencoder.recipes.klf8", "KLF8Recipe"),
    "mlp-vae": ("train.autoencoder.recipes.mlp_vae", "MLPRecipe"),
    "autoencoder-tiny": ("train.autoencoder.recipes.student", "DistillRecipe"),
}


def recipe_for(cfg):
    """The recipe of ``cfg.model.kind`` (checked by ``train.autoencoder.config.validate``)."""
    module, name = RECIPES[cfg.model.kind]
    return getattr(importlib.import_module(module), name)(cfg)

"""The recipe ``train.autoencoder.loop`` uses for ``model.kind: mlp-vae`` (:class:`MLPRecipe`, chosen
once by :func:`train.autoencoder.recipes.recipe_for`): model, data and the ELBO.

The loop itself (accelerate, checkpoints, resume, EMA, export) is the kl-f8 one; only what
differs lives here:

* ``build_mlp_vae``: an ``MLPVAE`` from the ``mlp`` config section;
* ``ArrayDataset``: MNIST-like arrays (.npz, idx folders, torchvision) indexed by
  ``(index, epoch)`` like ``CropDataset``, with stochastic binarisation drawn from
  ``(seed, epoch, index)`` so a resumed run sees the same bits; image folders use
  ``CropDataset`` at ``mlp.image_size`` (the same random crops kl-f8 trains on);
* ``ELBOWrapper`` / ``ELBOLoss``: one forward through DDP returning the decoder's parameters and
  the posterior, and the negative ELBO with beta, KL annealing and free bits.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from codec.baseline.arrays import is_array_source, load_split, to_tensor
from codec.baseline.elbo import kl_weight, targets, terms_from, training_loss
from codec.baseline.mlp_vae import MLPVAE
from train.autoencoder.config import TrainConfig
from train.autoencoder.data import CropDataset, gather_images
from train.autoencoder.recipes import StepContext, StepResult
from train.autoencoder.recipes.klf8 import measured_scale


def build_mlp_vae(cfg: TrainConfig) -> MLPVAE:
    m = cfg.mlp
    if cfg.model.init_from:
        return MLPVAE.from_pretrained(cfg.model.init_from)
    return MLPVAE(
        image_size=m.image_size, in_channels=m.in_channels, hidden_sizes=tuple(m.hidden_sizes),
        latent_size=m.latent_size, likelihood=m.likelihood, activation=m.activation,
        num_classes=m.num_classes if m.conditional else 0,
    )


class ArrayDataset(Dataset):
    """uint8 (N, H, W) images + labels as items ``{"pixels", "label", "path", "skipped"}``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, binarize: bool, seed: int, name: str):
        self.images, self.labels = to_tensor(images), torch.from_numpy(labels)
        self.binarize, self.seed, self.name = binarize, seed, name

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        x = self.images[index]
        if self.binarize:
            g = torch.Generator().manual_seed(hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF)
            x = torch.bernoulli((x + 1) / 2, generator=g) * 2 - 1
        return {"pixels": x, "label": int(self.labels[index]), "path": f"{self.name}[{index}]", "skipped": []}


def build_dataset(cfg: TrainConfig) -> Dataset:
    sources = cfg.data.train
    arrays = [s for s in sources if is_array_source(s)]
    if arrays:
        if len(arrays) != len(sources) or len(arrays) > 1:
            raise ValueError(f"data.train: give one array source (.npz, idx folder, torchvision:NAME), got {sources}")
        x, y = load_split(arrays[0], "train")
        if x.shape[1:] != (cfg.mlp.image_size, cfg.mlp.image_size) or cfg.mlp.in_channels != 1:
            raise ValueError(
                f"{arrays[0]}: images are {x.shape[1]}x{x.shape[2]} greyscale; set mlp.image_size="
                f"{x.shape[1]} and mlp.in_channels=1"
            )
        return ArrayDataset(x, y, cfg.mlp.binarize, cfg.seed, str(arrays[0]))
    if cfg.mlp.conditional:
        raise ValueError("mlp.conditional needs labelled data (.npz, idx folder or torchvision:NAME)")
    if cfg.mlp.binarize and cfg.mlp.likelihood == "bernoulli" and cfg.mlp.in_channels == 3:
        raise ValueError("mlp.binarize on colour photos is almost surely a mistake; set mlp.binarize=false")
    d = cfg.data
    return CropDataset(gather_images(sources, d.image_column, d.hf_split), cfg.mlp.image_size, d.small_images,
                       d.random_flip, cfg.seed, d.crop_mode, d.crop_min_fraction)


def collate(items: list[dict]) -> dict:
    batch = {
        "pixels": torch.stack([it["pixels"] for it in items]),
        "paths": [it["path"] for it in items],
        "skipped": [s for it in items for s in it["skipped"]],
    }
    if "label" in items[0]:
        batch["labels"] = torch.tensor([it["label"] for it in items])
    return batch


def fit_channels(x: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Photos load as RGB; a greyscale model reads their mean."""
    return x.mean(1, keepdim=True) if in_channels == 1 and x.shape[1] == 3 else x


class ELBOWrapper(nn.Module):
    """One forward call through DDP: ``(decoder parameters, posterior)`` of a sampled z."""

    def __init__(self, vae: MLPVAE):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, labels=None):
        posterior = self.vae.encode(x, labels).latent_dist
        return self.vae.decoder_params(posterior.sample(), labels), posterior


class ELBOLoss:
    """Negative ELBO per example, averaged: rec + w(step) * KL (beta, annealing, free bits)."""

    def __init__(self, cfg: TrainConfig):
        self.m = cfg.mlp

    def __call__(self, vae: MLPVAE, x: torch.Tensor, params: torch.Tensor, posterior, step: int):
        terms = terms_from(vae, targets(x), params, posterior)
        m = self.m
        w = kl_weight(step, m.beta, m.kl_anneal, m.kl_anneal_steps, m.kl_anneal_cycles, m.kl_anneal_ratio)
        return training_loss(terms, w, m.free_bits)


class MLPRecipe:
    """``model.kind: mlp-vae`` for the training loop (see :mod:`train.autoencoder.recipes`)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.elbo = ELBOLoss(cfg)

    def describe(self) -> str:
        return self.cfg.model.init_from or self.cfg.model.kind

    def build_vae(self) -> MLPVAE:
        return build_mlp_vae(self.cfg)

    def wrap(self, vae: MLPVAE) -> nn.Module:
        return ELBOWrapper(vae)

    def perceptual_net(self) -> None:
        return None  # the ELBO has no perceptual term

    def vf_loss(self) -> None:
        return None  # no latent grid to align (config.validate_vf refuses loss.vf_weight)

    def dataset(self):
        return build_dataset(self.cfg), collate

    def inputs(self, batch: dict, device: torch.device) -> torch.Tensor:
        return fit_channels(batch["pixels"].to(device, non_blocking=True), self.cfg.mlp.in_channels)

    def loss(self, ctx: StepContext, x: torch.Tensor, batch: dict) -> StepResult:
        """The negative ELBO (no discriminator for the MLP VAE: train.autoencoder.config.validate)."""
        labels = batch["labels"].to(x.device) if self.cfg.mlp.conditional else None
        params, posterior = ctx.model(x, labels)  # params: the decoder's distribution parameters
        loss, logs = self.elbo(ctx.raw_model, x, params, posterior, ctx.step)
        return StepResult(fake=params, loss=loss, logs=logs, real=x)

    def export_factors(self, codec, measure) -> dict:
        if self.cfg.mlp.conditional:  # Codec encodes without labels; its latents are N(0, I) by its KL
            codec.set_factors(scaling_factor=1.0)
            return {"scaling_factor": 1.0, "note": "not measured: conditional VAE"}
        return measured_scale(codec, measure)

    def shown(self, raw_vae: MLPVAE, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return raw_vae.mean_image(params[:4].detach().float()).mul(2).sub(1).view_as(x[:4])

"""The kl-f8 recipe: the convolutional ``AutoencoderKL`` on random crops, trained with
reconstruction + LPIPS + KL (+ PatchGAN, whose step the loop adds when enabled), and optionally
the EQ-VAE term. The other recipes (:mod:`train.autoencoder.recipes`) start from this one.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL
from torch import nn

from codec import equivariance
from codec.evaluation.lpips_weights import load_lpips
from codec.factors import factors_from_stats
from codec.models import build_autoencoder, load_autoencoder
from codec.sources import is_stream
from codec.sources.stream import ImageStream, cache_path
from train.autoencoder import eq_vae
from train.autoencoder.config import TrainConfig
from train.autoencoder.data import CropDataset, Cropper, TooSmall, collate, gather_images
from train.autoencoder.losses import frozen
from train.autoencoder.recipes import StepContext, StepResult
from train.autoencoder.vf_loss import VFLoss


class Autoencoder(nn.Module):
    """Wraps ``AutoencoderKL`` so one forward call (through DDP) returns the posterior too, and
    holds the VF loss's projector (trained and checkpointed with the codec, never exported)."""

    def __init__(self, vae: AutoencoderKL, projector: nn.Module | None = None):
        super().__init__()
        self.vae = vae
        self.projector = projector

    def forward(self, x: torch.Tensor, transform: str | None = None, latent_op=None):
        """(reconstruction, posterior, decoding of transform(z) or None for the EQ-VAE term,
        projector(z) or None for the VF loss); ``latent_op``: what the published EQ-VAE decodes
        instead of z (τ(z))."""
        posterior = self.vae.encode(x).latent_dist  # (B, 2*4, H/8, W/8) -> mean, logvar
        z = posterior.sample()  # sampled z, as in the LDM recipe
        recon = self.vae.decode(latent_op(z) if latent_op is not None else z).sample
        transformed = self.vae.decode(equivariance.apply(transform, z)).sample if transform else None
        projected = self.projector(z) if self.projector is not None else None  # (B, C_vf, H/8, W/8)
        return recon, posterior, transformed, projected


class KLF8Recipe:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self._vf = None

    def vf_loss(self) -> VFLoss | None:
        """VA-VAE's alignment term (its foundation model loaded once), None when off."""
        if self.cfg.loss.vf_weight > 0 and self._vf is None:
            self._vf = VFLoss(self.cfg.loss)
        return self._vf

    def describe(self) -> str:
        return self.cfg.model.init_from or self.cfg.model.preset

    def build_vae(self) -> AutoencoderKL:
        m = self.cfg.model
        if not m.init_from:
            return build_autoencoder(m.preset, m.latent_channels)
        vae = load_autoencoder(m.init_from)
        if m.latent_channels is not None and m.latent_channels != vae.config.latent_channels:
            raise ValueError(f"model.init_from {m.init_from} has {vae.config.latent_channels} latent channels, "
                             f"model.latent_channels asks for {m.latent_channels}; leave model.latent_channels unset "
                             "to fine-tune it as it is")
        return vae

    def wrap(self, vae: AutoencoderKL) -> nn.Module:
        vf = self.vf_loss()
        return Autoencoder(vae, vf.projector(vae.config.latent_channels) if vf is not None else None)

    def perceptual_net(self) -> nn.Module | None:
        loss = self.cfg.loss
        return load_lpips(loss.perceptual_net) if loss.perceptual_weight > 0 else None

    def dataset(self):
        """(dataset, collate): a map-style CropDataset, or an ImageStream where sources stream."""
        d = self.cfg.data
        crop = Cropper(d.crop_size, d.small_images, d.random_flip, d.crop_mode, d.crop_min_fraction)
        if any(is_stream(s, d.streaming) for s in d.train):  # all of them then (train.config.validate)
            return ImageStream(d.train, crop, self.cfg.seed, d.image_column, d.hf_split, unusable=(TooSmall,),
                               cache=cache_path(self.cfg.output_dir)), collate
        return CropDataset(gather_images(d.train, d.image_column, d.hf_split), crop, seed=self.cfg.seed), collate

    def inputs(self, batch: dict, device: torch.device) -> torch.Tensor:
        x = batch["pixels"].to(device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x

    def loss(self, ctx: StepContext, x: torch.Tensor, batch: dict) -> StepResult:
        """Reconstruction + LPIPS + KL (+ GAN, + EQ-VAE) of the generator phase, under autocast."""
        if self.cfg.loss.equivariance_weight > 0 and self.cfg.loss.equivariance_mode == "published":
            return self.eq_vae_loss(ctx, x)
        transform = self.pick_transform(ctx.step, ctx.rank)
        recon, posterior, transformed, projected = ctx.model(x, transform)
        # The discriminator judges x̂ here with its own weights frozen: its plain module is used
        # because no discriminator gradient may be produced now.
        with frozen(ctx.disc):
            loss, logs = ctx.gen_loss(x, recon, posterior, ctx.step, ctx.disc, ctx.last_layer, ctx.grad_scale,
                                      projected, ctx.encoder_last_layer)
        if transformed is not None:  # EQ-VAE: D(τ(z)) should be τ(x)
            eq = ctx.gen_loss.reconstruction(equivariance.apply(transform, x), transformed, ctx.step,
                                             per_image=x[0].numel())
            weight = self.cfg.loss.equivariance_weight
            loss = loss + weight * eq
            # From the logged value, not loss.item(): under fp16 an overflow of the GAN term's
            # scaled gradients makes ``loss`` NaN (train.autoencoder.losses.adversarial_loss) while
            # its value is finite; a NaN here would be counted as a non-finite step, not the scaler's skip.
            logs.update(equivariance=eq.item(), loss=logs["loss"] + weight * eq.item())
        return StepResult(fake=recon, loss=loss, logs=logs, real=x)

    def eq_vae_loss(self, ctx: StepContext, x: torch.Tensor) -> StepResult:
        """The published EQ-VAE step (:mod:`train.autoencoder.eq_vae`): the whole loss, GAN
        included, on τ(x) against D(τ(z)), on a downscaled image, or plain."""
        loss_cfg = self.cfg.loss
        this = eq_vae.draw(self.cfg.seed, ctx.rank, ctx.step, x.shape[-1] // 8, loss_cfg.equivariance_p_prior,
                           loss_cfg.equivariance_p_prior_s, loss_cfg.equivariance_anisotropic,
                           loss_cfg.equivariance_min_scale)
        target = this.image(x)
        if this.mode == "latent":
            recon, posterior, _, _ = ctx.model(x, latent_op=this.latent)
        else:
            recon, posterior, _, _ = ctx.model(target)
        with frozen(ctx.disc):
            loss, logs = ctx.gen_loss(target, recon, posterior, ctx.step, ctx.disc, ctx.last_layer, ctx.grad_scale)
        if this.mode == "latent" and loss_cfg.equivariance_weight != 1:  # 1: as published
            loss = loss * loss_cfg.equivariance_weight
            logs["loss"] *= loss_cfg.equivariance_weight
        logs["eq_vae_mode"] = float(eq_vae.MODES.index(this.mode))  # 0 plain, 1 image, 2 latent
        return StepResult(fake=recon, loss=loss, logs=logs, real=target, shown_against=target)

    def pick_transform(self, step: int, rank: int) -> str | None:
        """EQ-VAE's τ of this step, None when off: drawn from its own stream per (seed, rank, step),
        so resumes repeat it and the training RNG (posterior noise) is the same as without it."""
        names = self.cfg.loss.equivariance_transforms
        if self.cfg.loss.equivariance_weight <= 0 or self.cfg.loss.equivariance_mode != "additive":
            return None
        return names[int(np.random.default_rng([self.cfg.seed, rank, step]).integers(len(names)))]

    def last_layer(self, raw_vae) -> torch.Tensor:
        """The weight the adaptive GAN weight balances gradients at: the decoder's last conv."""
        return raw_vae.decoder.conv_out.weight

    def encoder_last_layer(self, raw_vae) -> torch.Tensor:
        """Where the VF loss's adaptive weight balances gradients: the encoder's last conv
        (the reference's ``get_encoder_last_layer``)."""
        return raw_vae.encoder.conv_out.weight

    def shown(self, raw_vae, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Reconstructions as images for the logged grid."""
        return recon[:4]

    def export_factors(self, codec, measure) -> dict:
        return measured_scale(codec, measure)


def measured_scale(codec, measure) -> dict:
    """Set an exported codec's scaling_factor (and its shift_factor, where it has one: SD3/FLUX.1
    codecs) from its training latents (``measure()``, see
    ``train.autoencoder.export.measure_training_latents``); returns the statistics kept in its metadata."""
    stats = measure()
    kind = "shift" if getattr(codec.vae.config, "shift_factor", None) is not None else "scale"
    codec.set_factors(**factors_from_stats(stats, kind))
    return stats

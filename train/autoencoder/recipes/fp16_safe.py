"""The fp16-safe fine-tune (``fp16_safe.bound`` > 0 with ``model.init_from``): the codec learns to
keep every activation of its encoder and decoder within ``bound`` while its outputs stay the
original's, the original being its frozen teacher.

* Before the first step, GroupNorm-fed convolutions that peak too high are scaled down, which
  changes no output (:func:`train.autoencoder.fp16_safe.rescale_groupnorm_inputs`).
* Each step: the teacher encodes the crops and decodes a sample ``z`` of its posterior (fp32,
  no gradients). The student encodes the crops (its posterior's mean and std match the teacher's,
  mean squared error × ``fp16_safe.latent_weight``) and decodes the same ``z`` (pixel error +
  ``loss.perceptual_weight`` · LPIPS against the teacher's decoding), plus
  ``fp16_safe.activation_weight`` × the activation penalty
  (:class:`train.autoencoder.fp16_safe.BoundedActivations`).
* The export keeps the teacher's latent factors: the latent space is the teacher's.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from codec.latent_space import space_of
from train.autoencoder.fp16_safe import BoundedActivations, rescale_groupnorm_inputs
from train.autoencoder.recipes import StepContext, StepResult
from train.autoencoder.recipes.klf8 import KLF8Recipe

RESCALE_IMAGES = 8  # training crops the rescaling measures peaks on (the same ones on every process)


class FP16SafeRecipe(KLF8Recipe):
    def describe(self) -> str:
        return f"{self.cfg.model.init_from}, made fp16-safe (activations within {self.cfg.fp16_safe.bound:g})"

    def build_vae(self):
        vae = super().build_vae()
        self.teacher = copy.deepcopy(vae).eval().requires_grad_(False)
        if self.cfg.fp16_safe.rescale:
            dataset, _ = self.dataset()
            images = [dataset[i]["pixels"] for i in range(min(RESCALE_IMAGES, len(dataset)))]
            factors = rescale_groupnorm_inputs(vae, images, self.cfg.fp16_safe.bound)
            # On a resume the checkpoint's weights replace these, which were rescaled the same way.
            print(f"fp16_safe: {len(factors)} GroupNorm-fed convolution(s) scaled down (outputs unchanged)"
                  + "".join(f"\n  {name}: x {factor:.3g}" for name, factor in factors.items()))
        return vae

    def wrap(self, vae) -> nn.Module:
        return BoundedActivations(vae, self.cfg.fp16_safe.bound)

    @torch.no_grad()
    def targets(self, x: torch.Tensor):
        """(teacher's posterior, a sample z of it, the teacher's decoding of z), in float32."""
        teacher = self.teacher.to(x.device)
        with torch.autocast(x.device.type, enabled=False):  # the reference stays float32 under mixed precision
            posterior = teacher.encode(x.float()).latent_dist
            z = posterior.sample()
            return posterior, z, teacher.decode(z).sample

    def loss(self, ctx: StepContext, x: torch.Tensor, batch: dict) -> StepResult:
        safe = self.cfg.fp16_safe
        teacher_posterior, z, teacher_images = self.targets(x)
        posterior, decoded, penalty, peaks = ctx.model(x, z)
        latent_mse = (F.mse_loss(posterior.mean.float(), teacher_posterior.mean)
                      + F.mse_loss(posterior.std.float(), teacher_posterior.std))
        rec, logs = ctx.gen_loss.reconstruction_terms(teacher_images, decoded, ctx.step)
        loss = rec.mean() + safe.latent_weight * latent_mse + safe.activation_weight * penalty
        logs.update(latent_mse=latent_mse.item(), activation_penalty=penalty.item(),
                    encoder_max_abs=peaks["encoder"].item(), decoder_max_abs=peaks["decoder"].item(),
                    loss=loss.item())
        return StepResult(fake=decoded.float(), loss=loss, logs=logs, real=teacher_images,
                          shown_against=teacher_images)

    def export_factors(self, codec, measure) -> dict:
        """The teacher's factors, unmeasured: the student's latents are the teacher's."""
        t = self.teacher.config
        factors = {k: t.get(k) for k in ("scaling_factor", "shift_factor", "latents_mean", "latents_std")}
        codec.set_factors(**factors)
        return {"latent_space": "the teacher's (fp16_safe fine-tune)", "teacher": self.cfg.model.init_from,
                "teacher_factors": factors,
                # decode/decompress compare latent spaces: the teacher's latents are this codec's
                "teacher_space": space_of(self.teacher, where=self.cfg.model.init_from)}

"""The student recipe (``python -m train.distill CONFIG``): a TAESD-style ``AutoencoderTiny``
preview codec distilled from any ``AutoencoderKL`` teacher (ours, a diffusers folder, a pipeline
folder or a single file).

The student lives in the teacher's *scaled* latent space, the latents ``Codec.encode`` and
diffusers pipelines hand to a diffusion model:

* its encoder learns ``E_s(x) ≈ scale(mean of q_teacher(z|x))``  (mean squared error, weight
  ``distill.latent_weight``);
* its decoder learns ``D_s(l) ≈ D_teacher(unscale(l))`` for those teacher latents ``l``: pixel
  (``loss.reconstruction``) + ``loss.perceptual_weight`` · LPIPS, plus the PatchGAN term with its
  adaptive weight when ``loss.disc_weight`` > 0; the discriminator's "real" images are the
  teacher's decodings.

It runs in the training loop of ``python -m train`` (:mod:`train.autoencoder.loop`: accelerate, accumulation,
checkpoints, resume, EMA, validation) through :class:`DistillRecipe`. The export is a diffusers
``AutoencoderTiny`` folder with ``scaling_factor`` 1 and ``shift_factor`` 0, so pipelines and
``vae-codec decode --codec STUDENT`` decode latents the teacher made. ``distill.train`` picks
what learns: ``both``, ``decoder`` (the preview decoder alone) or ``encoder``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from codec.factors import scale_latents, unscale_latents
from codec.io import is_autoencoder_tiny
from codec.latent_space import space_of
from codec.models import build_student, load_autoencoder
from train.autoencoder.config import TrainConfig
from train.autoencoder.losses import frozen
from train.autoencoder.recipes import StepContext, StepResult
from train.autoencoder.recipes.klf8 import KLF8Recipe

# The student decoder soft-clamps its input to ±3 (tanh(x / 3) * 3): teacher latents far wider
# than unit spread would be squashed.
UNNORMALISED_STD = 2.0


def load_teacher(path: str) -> AutoencoderKL:
    """The teacher, frozen in eval mode; anything but an AutoencoderKL is refused."""
    teacher = load_autoencoder(path)
    if not isinstance(teacher, AutoencoderKL):
        raise ValueError(f"distill.teacher {path}: a {type(teacher).__name__}, not an AutoencoderKL; "
                         "students learn from KL autoencoders (ours or diffusers')")
    return teacher.eval().requires_grad_(False)


class Student(nn.Module):
    """The student's trained parts in one forward call (for DDP): its encoder on the images and
    its decoder on the teacher's latents, each only where ``distill.train`` trains it."""

    def __init__(self, vae, parts: str):
        super().__init__()
        self.vae, self.parts = vae, parts

    def forward(self, x: torch.Tensor, teacher_latents: torch.Tensor):
        latents = self.vae.encode(x).latents if self.parts in ("both", "encoder") else None
        decoded = self.vae.decode(teacher_latents).sample if self.parts in ("both", "decoder") else None
        return latents, decoded


class DistillRecipe(KLF8Recipe):
    """``model.kind: autoencoder-tiny`` for the training loop (see :mod:`train.autoencoder.recipes`): the
    same crops and LPIPS as kl-f8, another network, loss and export."""

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.teacher = load_teacher(cfg.distill.teacher)
        self.parts = cfg.distill.train
        self.checked_spread = False

    def describe(self) -> str:
        d = self.cfg.distill
        start = self.cfg.model.init_from or f"preset {d.student}"
        return f"AutoencoderTiny student ({start}, trains {d.train}) of {d.teacher}"

    def build_vae(self):
        channels = self.teacher.config.latent_channels
        if self.cfg.model.init_from:
            vae = load_autoencoder(self.cfg.model.init_from)
            if not is_autoencoder_tiny(vae):
                raise ValueError(f"model.init_from {self.cfg.model.init_from}: a {type(vae).__name__}, "
                                 "not an AutoencoderTiny student")
            if (vae.config.scaling_factor, vae.config.shift_factor or 0.0) != (1.0, 0.0):
                # It now learns the teacher's *scaled* latents, which need no factors (1 and 0): keeping
                # its own (e.g. TAESD3's 1.5305 / 0.0609) would rescale them wrongly on every decode.
                print(f"model.init_from {self.cfg.model.init_from}: scaling_factor {vae.config.scaling_factor} "
                      f"and shift_factor {vae.config.shift_factor} become 1 and 0 (the student learns the "
                      "teacher's scaled latents)")
                vae.register_to_config(scaling_factor=1.0, shift_factor=0.0)
        else:
            vae = build_student(self.cfg.distill.student, channels)
        if vae.config.latent_channels != channels:
            raise ValueError(f"the student has {vae.config.latent_channels} latent channels, the teacher "
                             f"{self.cfg.distill.teacher} has {channels}: they must match")
        frozen_part = {"encoder": vae.decoder, "decoder": vae.encoder}.get(self.parts)
        if frozen_part is not None:
            frozen_part.requires_grad_(False)
        return vae

    def wrap(self, vae) -> nn.Module:
        return Student(vae, self.parts)

    def last_layer(self, raw_vae) -> torch.Tensor:
        return raw_vae.decoder.layers[-1].weight  # DecoderTiny's last conv (then only x * 2 - 1)

    @torch.no_grad()
    def targets(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(teacher's scaled latents, teacher's decoding of them) for a batch; the decoding only
        where the student's decoder trains."""
        teacher = self.teacher.to(x.device)
        mean = teacher.encode(x).latent_dist.mean  # Codec.encode's latents: the posterior mean
        latents = scale_latents(mean.float(), teacher.config)
        self.check_spread(latents)
        decoded = teacher.decode(mean).sample if self.parts != "encoder" else None
        return latents, decoded

    def check_spread(self, latents: torch.Tensor) -> None:
        if self.checked_spread:
            return
        self.checked_spread = True
        std = float(latents.float().std())
        if std > UNNORMALISED_STD:
            warnings.warn(f"the teacher's scaled latents have std {std:.2f}: the student's decoder squashes "
                          "inputs beyond ±3, so set the teacher's factors first (`vae-codec scale`)",
                          RuntimeWarning, stacklevel=2)

    def loss(self, ctx: StepContext, x: torch.Tensor, batch: dict) -> StepResult:
        """Latent matching and/or the decoder's terms: the shared generator terms (pixel + LPIPS
        + GAN, train.autoencoder.losses.GeneratorLoss) with the teacher's decodings as the target,
        as a mean over elements (no KL: a student has no posterior)."""
        teacher_latents, teacher_images = self.targets(x)
        latents, decoded = ctx.model(x, teacher_latents)
        latent_loss = x.new_zeros(())
        logs = {}
        if latents is not None:
            latent_mse = F.mse_loss(latents.float(), teacher_latents)
            latent_loss = self.cfg.distill.latent_weight * latent_mse
            logs["latent_mse"] = latent_mse.item()
        if decoded is None:  # encoder only: the grid shows the teacher decoding the student's latents
            logs.update(rec=logs["latent_mse"], loss=latent_loss.item())
            return StepResult(fake=latents, loss=latent_loss, logs=logs, real=x)
        rec, rec_logs = ctx.gen_loss.reconstruction_terms(teacher_images, decoded, ctx.step)
        logs.update(rec_logs)
        with frozen(ctx.disc):  # the adaptive GAN weight, as for kl-f8
            loss, logs = ctx.gen_loss.with_adversarial(rec.mean(), latent_loss, decoded.float(), ctx.step, ctx.disc,
                                                       ctx.last_layer, ctx.grad_scale, logs)
        return StepResult(fake=decoded.float(), loss=loss, logs=logs, real=teacher_images)

    @torch.no_grad()
    def shown(self, raw_vae, shown: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.parts == "encoder":  # student latents, seen through the teacher's decoder
            return self.teacher.decode(unscale_latents(shown[:4].float(), self.teacher.config)).sample
        return shown[:4]

    def export_factors(self, codec, measure) -> dict:
        """Nothing to measure: the student's latents are the teacher's scaled ones (scaling_factor
        1, shift 0 as built); the metadata says whose."""
        t = self.teacher.config
        return {"latent_space": "the teacher's scaled latents", "teacher": self.cfg.distill.teacher,
                "teacher_factors": {k: t.get(k) for k in ("scaling_factor", "shift_factor", "latents_mean",
                                                          "latents_std")},
                # what decode/decompress compare: teacher and student decode each other's latents
                "teacher_space": space_of(self.teacher, where=self.cfg.distill.teacher)}

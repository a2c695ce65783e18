"""The run's state: everything the step functions share (:class:`Run`), built once by
:func:`build_run` from the config and the model kind's recipe (:mod:`train.autoencoder.recipes`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from torch import nn
from torch.utils.data import Dataset

from train.autoencoder.config import TrainConfig
from train.autoencoder.discriminator import PatchDiscriminator
from train.autoencoder.losses import GeneratorLoss
from train.autoencoder.recipes import recipe_for
from train.autoencoder.vf_loss import check_resumable
from train.common import checkpoints as ckpt
from train.common import session as runs
from train.common.guards import NonFiniteGuard
from train.common.session import TrainState


def build_vae(cfg: TrainConfig):
    return recipe_for(cfg).build_vae()


@dataclass
class Run:
    """Everything the step functions share, built once by :func:`build_run`."""

    cfg: TrainConfig
    accelerator: Accelerator
    recipe: object
    model: nn.Module  # prepared (DDP where several processes)
    raw_vae: nn.Module  # the plain model: EMA, export and the last layer
    gen_loss: GeneratorLoss
    opt_g: torch.optim.Optimizer
    trainable: list
    base_lr: float
    disc: nn.Module | None = None
    raw_disc: nn.Module | None = None
    opt_d: torch.optim.Optimizer | None = None
    base_disc_lr: float = 0.0
    last_layer: torch.Tensor | None = None
    encoder_last_layer: torch.Tensor | None = None  # the VF loss's, when on
    ema: EMAModel | None = None
    state: TrainState = field(default_factory=TrainState)
    guard: NonFiniteGuard | None = None
    out: Path = Path(".")
    stopped_by: str | None = None  # "max_steps" or "max_minutes" once the last step is done

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def own_state(self) -> dict:
        """Our objects saved in checkpoints beside accelerate's (never pickled)."""
        return {"train": self.state, "nonfinite": self.guard, "logvar": self.gen_loss.logvar_state,
                **({"ema": self.ema} if self.ema is not None else {})}


def build_run(cfg: TrainConfig, accelerator: Accelerator, resume_from: Path | None) -> tuple[Run, Dataset, object]:
    """Model, losses, optimisers and data, prepared by accelerate; returns (run, dataset, collate)."""
    recipe = recipe_for(cfg)
    vae = recipe.build_vae()
    if resume_from:
        ckpt.check_compatible(resume_from, vae.config)
    if cfg.model.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    if cfg.model.train_decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    model = recipe.wrap(vae)  # kl-f8 with loss.vf_weight: the VF projector inside, trained beside the codec
    vf = recipe.vf_loss()
    if resume_from:
        check_resumable(resume_from, getattr(model, "projector", None))
    gen_loss = GeneratorLoss(cfg.loss, recipe.perceptual_net(), vf)
    disc = (PatchDiscriminator(channels=cfg.loss.disc_channels, layers=cfg.loss.disc_layers)
            if cfg.loss.disc_weight > 0 else None)

    scale = accelerator.num_processes * cfg.batch_size * cfg.grad_accum if cfg.optim.scale_lr else 1
    base_lr, base_disc_lr = cfg.optim.lr * scale, (cfg.optim.disc_lr or cfg.optim.lr) * scale
    trainable = [p for p in model.parameters() if p.requires_grad]  # the codec's (+ the VF projector's)
    opt_g = torch.optim.AdamW(trainable + ([gen_loss.logvar] if cfg.loss.learn_logvar else []),
                              lr=base_lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    # weight_decay given explicitly: AdamW's own default (0.01) is not the recipe's.
    opt_d = (torch.optim.AdamW(disc.parameters(), lr=base_disc_lr, betas=tuple(cfg.optim.betas),
                               weight_decay=cfg.optim.weight_decay) if disc is not None else None)
    dataset, collate_fn = recipe.dataset()

    if disc is not None:
        model, disc, opt_g, opt_d = accelerator.prepare(model, disc, opt_g, opt_d)
    else:
        model, opt_g = accelerator.prepare(model, opt_g)
    gen_loss.to(accelerator.device)
    raw_vae = accelerator.unwrap_model(model).vae
    ema = EMAModel(raw_vae.parameters(), decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema is not None:
        ema.to(accelerator.device)
    runs.seed_per_process(accelerator, cfg.seed, cfg.deterministic)
    run = Run(
        cfg=cfg, accelerator=accelerator, recipe=recipe, model=model, raw_vae=raw_vae, gen_loss=gen_loss,
        opt_g=opt_g, trainable=trainable, base_lr=base_lr, disc=disc,
        raw_disc=accelerator.unwrap_model(disc) if disc is not None else None, opt_d=opt_d,
        base_disc_lr=base_disc_lr, last_layer=recipe.last_layer(raw_vae) if disc is not None else None,
        encoder_last_layer=recipe.encoder_last_layer(raw_vae) if vf is not None else None,
        ema=ema, guard=NonFiniteGuard(cfg.max_nonfinite_steps), out=Path(cfg.output_dir),
    )
    return run, dataset, collate_fn

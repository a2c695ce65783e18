"""The diffusion model: a diffusers ``UNet2DModel`` (optionally class-conditional), its noise
scheduler, and sampling (DDIM, or Euler steps for flow matching; classifier-free guidance)."""

from __future__ import annotations

import torch

from train.diffusion.config import LDMConfig


def build_unet(cfg: LDMConfig, shape: tuple[int, ...], num_classes: int = 0):
    """The UNet; with ``num_classes``, a class embedding of num_classes + 1 entries (the last:
    the null class of classifier-free guidance)."""
    from diffusers import UNet2DModel

    m = cfg.model
    levels = len(m.block_out_channels)
    plain = levels - m.attention_levels
    return UNet2DModel(
        sample_size=list(shape[1:]), in_channels=shape[0], out_channels=shape[0],
        block_out_channels=tuple(m.block_out_channels), layers_per_block=m.layers_per_block,
        down_block_types=("DownBlock2D",) * plain + ("AttnDownBlock2D",) * m.attention_levels,
        up_block_types=("AttnUpBlock2D",) * m.attention_levels + ("UpBlock2D",) * plain,
        norm_num_groups=m.norm_num_groups,
        num_class_embeds=num_classes + 1 if num_classes else None,
    )


def build_scheduler(cfg: LDMConfig):
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if cfg.objective == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.num_train_timesteps, shift=1.0)
    # clip_sample off: it clips predicted x0 to [-1, 1], right for pixels, wrong for latents.
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type, clip_sample=False,
    )


@torch.no_grad()
def sample_latents(unet, train_scheduler, count: int, steps: int, generator: torch.Generator,
                   labels: torch.Tensor | None = None, guidance: float = 1.0) -> torch.Tensor:
    """Sampling from N(0, I): (count, C, h, w) latents in the codec's scaled units. DDIM for a
    DDPM-trained model, Euler steps for a flow-matching one (``train_scheduler``, the run's
    scheduler or ``DDPMPipeline.from_pretrained(...).scheduler``, says which).

    A class-conditional UNet takes ``labels`` (count,), with classifier-free guidance (Ho &
    Salimans 2022): ``uncond + guidance * (cond - uncond)``, the null class being the last
    embedding. Without ``labels`` it samples unconditionally: every sample takes the null class."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    flow = isinstance(train_scheduler, FlowMatchEulerDiscreteScheduler)
    scheduler = (FlowMatchEulerDiscreteScheduler if flow else DDIMScheduler).from_config(train_scheduler.config)
    scheduler.set_timesteps(steps)
    device = next(unet.parameters()).device
    shape = (count, unet.config.in_channels, *unet.config.sample_size)
    x = torch.randn(shape, generator=generator).to(device)
    null = None
    if unet.config.num_class_embeds:  # class-conditional: the last embedding is the null class
        null = torch.full((count,), unet.config.num_class_embeds - 1, dtype=torch.long, device=device)
        if labels is None:
            labels, guidance = null, 1.0  # unconditional samples (the model's own, no guidance)
    for t in scheduler.timesteps:
        model_input = x if flow else scheduler.scale_model_input(x, t)
        if labels is None:
            out = unet(model_input, t.to(device)).sample
        elif guidance == 1.0:  # no guidance: the conditional prediction alone, one pass
            out = unet(model_input, t.to(device), class_labels=labels.to(device)).sample
        else:
            both = unet(torch.cat([model_input, model_input]), t.to(device),
                        class_labels=torch.cat([labels.to(device), null])).sample
            cond, uncond = both.chunk(2)
            out = uncond + guidance * (cond - uncond)
        x = scheduler.step(out, t, x).prev_sample
    return x.float().cpu()

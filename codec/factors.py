"""Latent factors, applied exactly the way diffusers pipelines apply them.

An ``AutoencoderKL`` config carries up to three normalisations of the raw latent ``z``;
pipelines use one of them, and so do we (same formulas, same order of operations, so a
pipeline and :class:`codec.Codec` agree to the last bit):

=======================================  ==========================================  ==========================================
config                                   to the diffusion model (encode)             back to the decoder (decode)
=======================================  ==========================================  ==========================================
``latents_mean`` + ``latents_std``       ``(z - mean) * scaling_factor / std``       ``latents * std / scaling_factor + mean``
(per channel; SDXL, Wan, Qwen pipelines)
``shift_factor`` (SD3, Flux)             ``(z - shift_factor) * scaling_factor``     ``latents / scaling_factor + shift_factor``
neither (SD 1.x/2.x)                     ``scaling_factor * z``                      ``latents / scaling_factor``
=======================================  ==========================================  ==========================================

A config setting both per-channel statistics and a shift is ambiguous (no pipeline applies
both) and refused.
"""

from __future__ import annotations

import torch


def _config_get(config, key):
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def channel_stats(config, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(latents_mean, latents_std)`` shaped (1, C, 1, 1) like ``like`` ((1, D) for flat latents),
    or None when unset."""
    mean, std = _config_get(config, "latents_mean"), _config_get(config, "latents_std")
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise ValueError("the VAE config sets only one of latents_mean / latents_std; set both or neither")
    if _config_get(config, "shift_factor"):
        raise ValueError(
            "the VAE config sets both latents_mean/latents_std and shift_factor; diffusers "
            "pipelines apply one or the other, so the latents would be ambiguous"
        )
    channels = like.shape[1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"latents_mean/latents_std have {len(mean)}/{len(std)} values for {channels} latent channels"
        )
    view = (1, channels) + (1,) * (like.ndim - 2)  # (1, C, 1, 1); (1, D) for the MLP VAE's flat latents
    return (torch.tensor(mean, dtype=like.dtype).view(view), torch.tensor(std, dtype=like.dtype).view(view))


def scale_latents(z: torch.Tensor, config) -> torch.Tensor:
    """Raw latents ``z`` (B, C, h, w) -> what a diffusion model is trained on."""
    scaling = _config_get(config, "scaling_factor")
    stats = channel_stats(config, z)
    if stats is not None:
        mean, std = stats
        return (z - mean) * scaling / std  # StableDiffusionXLImg2ImgPipeline.prepare_latents
    shift = _config_get(config, "shift_factor")
    if shift is not None:
        return (z - shift) * scaling  # StableDiffusion3Img2ImgPipeline._encode_vae_image
    return scaling * z  # StableDiffusionImg2ImgPipeline.prepare_latents


def unscale_latents(latents: torch.Tensor, config) -> torch.Tensor:
    """What a diffusion model produced -> raw latents for ``vae.decode``."""
    scaling = _config_get(config, "scaling_factor")
    stats = channel_stats(config, latents)
    if stats is not None:
        mean, std = stats
        return latents * std / scaling + mean  # StableDiffusionXLPipeline.__call__
    shift = _config_get(config, "shift_factor")
    if shift is not None:
        return latents / scaling + shift  # StableDiffusion3Pipeline.__call__
    return latents / scaling  # StableDiffusionPipeline.__call__


def scale_std(std: torch.Tensor, config) -> torch.Tensor:
    """A posterior standard deviation in raw units -> the same spread in scaled units."""
    stats = channel_stats(config, std)
    scaling = _config_get(config, "scaling_factor")
    return std * scaling / stats[1] if stats is not None else std * scaling


# ------------------------------------------------------------------------- choosing factors
NORMALISATIONS = ("scale", "shift", "per-channel")  # the three rows of the table above


def normalisation_of(config) -> str:
    """Which of the three normalisations ``config`` uses (re-measuring keeps it)."""
    if _config_get(config, "latents_mean") is not None:
        return "per-channel"
    if _config_get(config, "shift_factor") is not None:
        return "shift"
    return "scale"


def factors_from_stats(stats: dict, normalisation: str) -> dict:
    """``Codec.set_factors`` arguments that normalise latents with measured ``stats``
    (``Codec.measure_factors``) to zero mean (shift, per-channel) and unit variance."""
    if normalisation == "per-channel":  # latents_mean/std carry the scale; scaling_factor 1 keeps it unit
        return {"scaling_factor": 1.0, "latents_mean": stats["channel_mean"], "latents_std": stats["channel_std"]}
    if normalisation == "shift":
        return {"scaling_factor": stats["scaling_factor"], "shift_factor": stats["mean"]}
    if normalisation == "scale":
        return {"scaling_factor": stats["scaling_factor"]}
    raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")

"""Configuration of ``python -m train.ldm``: a latent diffusion model on compressed latents.

Same machinery as the autoencoder's (:mod:`train.common.config`) (defaults here, YAML and ``--set a.b=c`` override,
unknown keys and wrong types are errors).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from train.common.config import load_config
from train.common.ranges import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, SHARE, check_ranges


@dataclass
class UNetConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 256, 256])
    layers_per_block: int = 2
    attention_levels: int = 2  # self-attention in the deepest N levels (AttnDown/UpBlock2D)
    norm_num_groups: int = 32


@dataclass
class LDMDataConfig:
    latents: str = ""  # a folder written by `vae-codec compress`
    codec: str | None = None  # the codec to decode samples with (default: the one that made them)
    fresh_samples: bool = True  # shards with mean+std: a new posterior sample every time
    num_workers: int = 0


@dataclass
class LDMConfig:
    model: UNetConfig = field(default_factory=UNetConfig)
    data: LDMDataConfig = field(default_factory=LDMDataConfig)
    output_dir: str = "runs/ldm"
    seed: int = 0
    batch_size: int = 32  # per process
    max_steps: int = 100_000
    lr: float = 1e-4
    warmup_steps: int = 500
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    mixed_precision: str = "no"  # "no", "fp16", "bf16" or "auto" (as train.config)
    keep_freed_memory: bool = True  # CPU runs: reuse freed memory (as train.config)
    ema_decay: float = 0.9999  # 0 disables EMA; samples and the exported UNet use EMA weights
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"  # DDPMScheduler's beta_schedule
    objective: str = "ddpm"  # "ddpm" (DDPMScheduler, DDIM sampling) or "flow" (rectified flow, Euler)
    prediction_type: str = "epsilon"  # with ddpm: "epsilon" or "v_prediction"
    sample_steps: int = 50  # DDIM (ddpm) or Euler (flow) steps when sampling
    num_samples: int = 16  # images in each sample grid
    sample_every: int = 5000  # 0: only at the end
    checkpoint_every: int = 5000
    keep_checkpoints: int = 2
    log_every: int = 50
    resume: bool = False
    max_minutes: float = 0.0  # wall-clock budget of this invocation (then a checkpoint; resume=true goes on)
    max_nonfinite_steps: int = 5  # skip steps with an inf/NaN loss; stop after this many in a row
    # Class-conditional when the latents carry labels (`vae-codec compress --labels folders`, or
    # .cls side data): "auto", "yes" (labels required) or "no" (ignore them).
    class_conditional: str = "auto"
    class_dropout: float = 0.1  # share of labels replaced by the null class (classifier-free guidance)
    guidance_scale: float = 3.0  # at sampling: uncond + scale * (cond - uncond); 1 = no guidance


# The valid range of every numeric key (train.common.ranges).
LDM_RANGES = {
    "model.block_out_channels": AT_LEAST_ONE, "model.layers_per_block": AT_LEAST_ONE,
    "model.attention_levels": NON_NEGATIVE, "model.norm_num_groups": AT_LEAST_ONE,
    "data.num_workers": NON_NEGATIVE,
    "seed": NON_NEGATIVE, "batch_size": AT_LEAST_ONE, "max_steps": AT_LEAST_ONE, "lr": POSITIVE,
    "warmup_steps": NON_NEGATIVE, "weight_decay": NON_NEGATIVE, "max_grad_norm": NON_NEGATIVE,
    "ema_decay": SHARE, "num_train_timesteps": AT_LEAST_ONE, "sample_steps": AT_LEAST_ONE,
    "num_samples": AT_LEAST_ONE, "sample_every": NON_NEGATIVE, "checkpoint_every": AT_LEAST_ONE,
    "keep_checkpoints": AT_LEAST_ONE, "log_every": AT_LEAST_ONE, "class_dropout": SHARE,
    "guidance_scale": NON_NEGATIVE, "max_minutes": NON_NEGATIVE, "max_nonfinite_steps": AT_LEAST_ONE,
}



def load_ldm_config(path=None, overrides=()) -> LDMConfig:
    return load_config(path, overrides, cls=LDMConfig)


def validate_ldm(cfg: LDMConfig) -> None:
    choices = {
        "objective": (cfg.objective, ("ddpm", "flow")),
        "prediction_type": (cfg.prediction_type, ("epsilon", "v_prediction")),
        "mixed_precision": (cfg.mixed_precision, ("auto", "bf16", "fp16", "no")),
        "class_conditional": (cfg.class_conditional, ("auto", "yes", "no")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"{key}: unknown {value!r}; choose from {list(allowed)}")
    check_ranges(cfg, LDM_RANGES)  # before the checks below divide by them
    if not 0 <= cfg.class_dropout < 1:
        raise ValueError(f"class_dropout must be in [0, 1), got {cfg.class_dropout}")
    if not cfg.data.latents:
        raise ValueError("data.latents is empty: set it to a folder made by `vae-codec compress`")
    for key in ("batch_size", "max_steps", "checkpoint_every", "keep_checkpoints", "sample_steps",
                "num_samples", "log_every"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    m = cfg.model
    if not 0 <= m.attention_levels <= len(m.block_out_channels):
        raise ValueError(f"model.attention_levels must be 0..{len(m.block_out_channels)}, got {m.attention_levels}")
    bad = [c for c in m.block_out_channels if c % m.norm_num_groups]
    if bad:
        raise ValueError(f"model.block_out_channels {bad} are not multiples of "
                         f"model.norm_num_groups {m.norm_num_groups}")

"""The autoencoder trainer's settings (``python -m train``, ``python -m train.distill``): typed
dataclasses whose defaults live here (machinery: :mod:`train.common.config`), and the checks that
types alone cannot express, ranges of every numeric key included (:data:`TRAIN_RANGES`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from train.common import config as _config
from train.common.config import config_parser, save_config, to_dict  # noqa: F401  (re-exported)
from train.common.ranges import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, SHARE, check_ranges


@dataclass
class ModelConfig:
    # "kl-f8" (AutoencoderKL), "mlp-vae" (the vanilla VAE baseline, section mlp) or
    # "autoencoder-tiny" (a TAESD-style student distilled from a teacher, section distill)
    kind: str = "kl-f8"
    preset: str = "tiny"  # see codec.models.PRESETS (sd3-f8c16, flux-f8c16, tiny-c16: 16 latent channels)
    latent_channels: int | None = None  # instead of the preset's (16: SD3/FLUX.1's); init_from must have it
    init_from: str | None = None  # a diffusers AutoencoderKL folder to fine-tune instead
    train_decoder_only: bool = False  # freeze the encoder (the sd-vae-ft-mse recipe)
    gradient_checkpointing: bool = False


@dataclass
class MLPConfig:
    """The vanilla VAE baseline (``model.kind: mlp-vae``, codec.baseline.mlp_vae.MLPVAE) and its ELBO."""

    image_size: int = 28  # square images; image folders are cropped to it at random, like kl-f8
    in_channels: int = 1  # 1 = greyscale, 3 = RGB
    hidden_sizes: list[int] = field(default_factory=lambda: [200, 200])
    latent_size: int = 50
    likelihood: str = "bernoulli"  # "bernoulli" (targets in [0, 1]) or "gaussian"
    activation: str = "tanh"
    conditional: bool = False  # a conditional VAE: labels (from .npz / idx data) to encoder and decoder
    num_classes: int = 10  # used when conditional
    binarize: bool = True  # stochastic binarisation of every training image (MNIST practice)
    beta: float = 1.0  # KL weight (beta-VAE)
    kl_anneal: str = "none"  # "none", "linear" or "cyclical"
    kl_anneal_steps: int = 10000  # linear: steps from 0 to beta; cyclical: steps the cycles span
    kl_anneal_cycles: int = 4
    kl_anneal_ratio: float = 0.5  # cyclical: fraction of each cycle spent rising
    free_bits: float = 0.0  # nats per latent dimension (batch mean) below which KL is not pushed


@dataclass
class DistillConfig:
    """An ``AutoencoderTiny`` student of an ``AutoencoderKL`` teacher (``python -m train.distill``).

    The student's latent space is the teacher's *scaled* latents (what ``Codec.encode`` and
    pipelines give, e.g. z * 0.18215): its encoder matches them, its decoder turns them into the
    teacher's decoding of them. Its own scaling_factor is 1 and shift 0, like TAESD's.
    """

    teacher: str | None = None  # an AutoencoderKL folder (ours or diffusers), pipeline folder or single file
    student: str = "taesd"  # codec.models.STUDENT_PRESETS; model.init_from continues an AutoencoderTiny
    train: str = "both"  # "both", "encoder" (decoder frozen) or "decoder" (encoder frozen)
    latent_weight: float = 1.0  # weight of the encoder's mean squared error to the teacher's latents


@dataclass
class DataConfig:
    # Image folders (recursive, with any webdataset .tar shards inside), .tar shards, brace
    # patterns of shards ("shards/train-{000000..000099}.tar"), file lists, or Hugging Face
    # datasets ("hf:NAME" on the Hub, or a save_to_disk folder).
    train: list[str] = field(default_factory=list)
    image_column: str = "image"  # Hugging Face datasets: the column holding the images
    hf_split: str = "train"  # Hugging Face datasets: the split trained on
    # Stream Hugging Face datasets instead of indexing them (URLs and pipe: shards always stream;
    # see codec/sources/stream.py for how streams are split and resumed).
    streaming: bool = False
    val: list[str] = field(default_factory=list)  # held-out images for validation
    crop_size: int = 128  # random square crops, a multiple of 8
    # "native": crop_size pixels at the image's own resolution; "resized": LDM-style, a random
    # crop_min_fraction..1 share of the short side, resized to crop_size (the whole image's content).
    crop_mode: str = "native"
    crop_min_fraction: float = 0.5
    small_images: str = "upscale"  # images smaller than the crop: "upscale" or "skip"
    random_flip: bool = True
    num_workers: int = 2
    val_images: int = 8  # how many validation images
    val_crop: int = 256  # centre crop for validation; 0 = full resolution


@dataclass
class LossConfig:
    reconstruction: str = "l1"  # "l1" or "l2"
    perceptual_weight: float = 1.0  # LPIPS weight (0 disables)
    perceptual_net: str = "vgg"  # "vgg" or "alex"
    perceptual_start: int = 0  # step from which LPIPS joins the loss
    kl_weight: float = 1e-6
    logvar_init: float = 0.0
    learn_logvar: bool = False  # LDM declared it learnable but never optimised it
    disc_weight: float = 0.0  # adversarial weight (0 = no discriminator); LDM used 0.5
    disc_start: int = 50001
    disc_factor: float = 1.0
    disc_layers: int = 3
    disc_channels: int = 64
    # EQ-VAE (Kouzelis et al. 2025), on when equivariance_weight > 0. equivariance_mode published
    # (train/autoencoder/eq_vae.py, zelaki/eqvae): with probability equivariance_p_prior a step's
    # whole loss (reconstruction, LPIPS, KL, GAN) is taken on tau(x) against D(tau(z)), tau a
    # bilinear downscaling of the latent side L to k (k from L x equivariance_min_scale to L - 1:
    # the paper's {8..31}/32 at 256-px crops) then a quarter turn; on the other steps, with
    # probability equivariance_p_prior_s, on a downscaled image (prior preservation); the weight
    # scales the transformed steps' loss (1: as published). equivariance_mode additive (ours, not
    # the paper's): every step also decodes tau(z) for a tau of equivariance_transforms and adds
    # weight x the reconstruction term of tau(x) against it (LPIPS where tau(x) is >= 32 px).
    equivariance_weight: float = 0.0
    equivariance_mode: str = "published"
    equivariance_p_prior: float = 0.5
    equivariance_p_prior_s: float = 0.25
    equivariance_min_scale: float = 0.25
    equivariance_anisotropic: bool = False  # published: independent scales for height and width (the paper's option)
    equivariance_transforms: list[str] = field(default_factory=lambda: ["down2", "down4", "rot90"])  # additive
    # VA-VAE's vision-foundation alignment (Yao et al. 2025; train/autoencoder/vf_loss.py), on when
    # vf_weight > 0 (the reference's 0.1): a 1x1 projector (trained, never exported) maps the sampled
    # latents to the features of vf_model (codec.foundation: dinov2-small, dinov2-base, a DINOv2 Hub id
    # or folder, or vgg16, the offline one); the cosine and distance-matrix terms with their margins,
    # x vf_weight x (vf_adaptive) |grad nll| / |grad vf| at the encoder's last conv, clamped to 1e8.
    vf_weight: float = 0.0
    vf_model: str = "dinov2-small"
    vf_margin_cos: float = 0.5
    vf_margin_distance: float = 0.25
    vf_adaptive: bool = True


@dataclass
class FP16SafeConfig:
    """Fine-tune ``model.init_from`` so every activation of its encoder and decoder stays within
    ``bound`` while its outputs stay the original's (its teacher); see
    :mod:`train.autoencoder.recipes.fp16_safe`. On when ``bound`` > 0."""

    bound: float = 0.0  # largest |activation| allowed; below fp16's 65504 (1000 leaves 65x headroom)
    activation_weight: float = 1.0  # weight of the penalty on activations beyond the bound
    latent_weight: float = 1.0  # weight of the encoder's match to the teacher's posterior (mean and std)
    rescale: bool = True  # first scale down GroupNorm-fed convolutions (free: outputs unchanged)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    disc_lr: float | None = None  # None: same as lr
    scale_lr: bool = False  # multiply lr by processes x batch x accumulation (LDM rule)
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"  # "constant" or "cosine" (decays to min_lr_ratio * lr)
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 0.0  # 0 disables clipping


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    fp16_safe: FP16SafeConfig = field(default_factory=FP16SafeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    output_dir: str = "runs/default"
    seed: int = 0
    batch_size: int = 4  # per process
    grad_accum: int = 1
    max_steps: int = 1000  # optimiser steps
    max_minutes: float = 0.0  # wall-clock budget for this invocation; 0 = none
    mixed_precision: str = "no"  # "no", "fp16", "bf16" (autocast, weights stay fp32) or "auto"
    ema_decay: float = 0.999  # 0 disables EMA
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    image_every: int = 250  # 0: no sample grids
    val_every: int = 500  # 0: no validation (with data.val)
    scale_samples: int = 32  # training crops used to measure the scaling factor at export
    resume: bool = False  # continue from the latest checkpoint in output_dir
    max_nonfinite_steps: int = 5  # skip steps with an inf/NaN loss; stop after this many in a row
    deterministic: bool = False  # deterministic GPU kernels (slower); CPU runs are always repeatable
    keep_freed_memory: bool = True  # CPU runs: reuse freed memory, no page faults (codec.host_memory)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Defaults <- YAML file <- ``a.b=c`` overrides (:func:`train.common.config.load_config`)."""
    return _config.load_config(path, overrides, TrainConfig)


FP16_MAX = 65504.0  # fp16's largest finite value (codec.evaluation.activations.FP16_MAX; torch-free here)

# The valid range of every numeric key (train.common.ranges); image_every / val_every 0 mean off.
TRAIN_RANGES = {
    "model.latent_channels": AT_LEAST_ONE,
    "mlp.image_size": AT_LEAST_ONE, "mlp.in_channels": "[1, 3]", "mlp.hidden_sizes": AT_LEAST_ONE,
    "mlp.latent_size": AT_LEAST_ONE, "mlp.num_classes": AT_LEAST_ONE, "mlp.beta": NON_NEGATIVE,
    "mlp.kl_anneal_steps": AT_LEAST_ONE, "mlp.kl_anneal_cycles": AT_LEAST_ONE, "mlp.kl_anneal_ratio": "(0, 1]",
    "mlp.free_bits": NON_NEGATIVE,
    "distill.latent_weight": NON_NEGATIVE,
    "data.crop_size": "[8, inf)", "data.crop_min_fraction": "(0, 1]", "data.num_workers": NON_NEGATIVE,
    "data.val_images": AT_LEAST_ONE, "data.val_crop": NON_NEGATIVE,
    "loss.perceptual_weight": NON_NEGATIVE, "loss.perceptual_start": NON_NEGATIVE,
    "loss.kl_weight": NON_NEGATIVE, "loss.logvar_init": "(-inf, inf)", "loss.disc_weight": NON_NEGATIVE,
    "loss.disc_start": NON_NEGATIVE, "loss.disc_factor": NON_NEGATIVE, "loss.disc_layers": AT_LEAST_ONE,
    "loss.disc_channels": AT_LEAST_ONE, "loss.equivariance_weight": NON_NEGATIVE,
    "loss.equivariance_p_prior": "[0, 1]", "loss.equivariance_p_prior_s": "[0, 1]",
    "fp16_safe.bound": "[0, 65504)", "fp16_safe.activation_weight": NON_NEGATIVE,
    "fp16_safe.latent_weight": NON_NEGATIVE,
    "loss.equivariance_min_scale": "(0, 1)", "loss.vf_weight": NON_NEGATIVE, "loss.vf_margin_cos": "[0, 2]",
    "loss.vf_margin_distance": "[0, 2]",
    "optim.lr": POSITIVE, "optim.disc_lr": POSITIVE, "optim.betas": SHARE, "optim.weight_decay": NON_NEGATIVE,
    "optim.warmup_steps": NON_NEGATIVE, "optim.min_lr_ratio": "[0, 1]", "optim.max_grad_norm": NON_NEGATIVE,
    "seed": NON_NEGATIVE, "batch_size": AT_LEAST_ONE, "grad_accum": AT_LEAST_ONE, "max_steps": AT_LEAST_ONE,
    "max_minutes": NON_NEGATIVE, "ema_decay": SHARE, "checkpoint_every": AT_LEAST_ONE,
    "keep_checkpoints": AT_LEAST_ONE, "log_every": AT_LEAST_ONE, "image_every": NON_NEGATIVE,
    "val_every": NON_NEGATIVE, "scale_samples": AT_LEAST_ONE, "max_nonfinite_steps": AT_LEAST_ONE,
}


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    choices = {
        "loss.reconstruction": (cfg.loss.reconstruction, ("l1", "l2")),
        "loss.perceptual_net": (cfg.loss.perceptual_net, ("alex", "vgg")),
        "data.small_images": (cfg.data.small_images, ("skip", "upscale")),
        "data.crop_mode": (cfg.data.crop_mode, ("native", "resized")),
        "optim.schedule": (cfg.optim.schedule, ("constant", "cosine")),
        "loss.equivariance_mode": (cfg.loss.equivariance_mode, ("additive", "published")),
        "mixed_precision": (cfg.mixed_precision, ("auto", "bf16", "fp16", "no")),
        "model.kind": (cfg.model.kind, ("autoencoder-tiny", "kl-f8", "mlp-vae")),
        "distill.train": (cfg.distill.train, ("both", "decoder", "encoder")),
        "mlp.likelihood": (cfg.mlp.likelihood, ("bernoulli", "gaussian")),
        "mlp.kl_anneal": (cfg.mlp.kl_anneal, ("cyclical", "linear", "none")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"{key}: unknown {value!r}; choose from {list(allowed)}")
    validate_data(cfg)
    for key in ("batch_size", "grad_accum", "max_steps", "checkpoint_every", "keep_checkpoints",
                "max_nonfinite_steps"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.model.kind == "mlp-vae":
        validate_mlp(cfg)
    if cfg.model.kind == "autoencoder-tiny":
        validate_student(cfg)
    if cfg.loss.equivariance_weight < 0:
        raise ValueError(f"loss.equivariance_weight must be >= 0, got {cfg.loss.equivariance_weight}")
    if cfg.loss.equivariance_weight > 0:
        validate_equivariance(cfg)
    if cfg.fp16_safe.bound:
        validate_fp16_safe(cfg)
    if cfg.loss.vf_weight > 0:
        validate_vf(cfg)
    if len(cfg.optim.betas) != 2:
        raise ValueError(f"optim.betas must have two values, got {cfg.optim.betas}")
    check_ranges(cfg, TRAIN_RANGES)


def validate_equivariance(cfg: TrainConfig) -> None:
    """EQ-VAE: a kl-f8 codec, and transforms that fit its crops (and its discriminator)."""
    loss = cfg.loss
    if cfg.model.kind != "kl-f8":
        raise ValueError(f"loss.equivariance_weight applies to kl-f8 codecs, not model.kind {cfg.model.kind}")
    latent = cfg.data.crop_size // 8
    if loss.equivariance_mode == "additive":
        from codec.equivariance import check_transforms  # late: only equivariance runs wait for torch

        if not loss.equivariance_transforms:
            raise ValueError("loss.equivariance_transforms is empty; name at least one transform")
        check_transforms(loss.equivariance_transforms, (latent, latent), "loss.equivariance_transforms")
        return
    scale = loss.equivariance_min_scale
    if latent * scale < 1:
        raise ValueError(f"loss.equivariance_min_scale {scale} of the {latent}x{latent} latent of a "
                         f"{cfg.data.crop_size}-px crop leaves no latent pixel; use data.crop_size >= "
                         f"{8 * math.ceil(1 / scale)} or a larger scale")
    smallest = math.ceil(latent * scale)
    if smallest >= latent:
        raise ValueError(f"loss.equivariance_min_scale {scale} leaves no size below the {latent}x{latent} latent's "
                         "own; use a smaller scale (the paper's is 0.25) or larger crops")
    needs = 2 ** (loss.disc_layers + 2)  # the PatchGAN's smallest input: each layer halves it
    if loss.disc_weight > 0 and 8 * smallest < needs:
        raise ValueError(f"EQ-VAE shrinks {cfg.data.crop_size}-px crops to {8 * smallest} px, smaller than the "
                         f"{needs} px a {loss.disc_layers}-layer discriminator takes; use data.crop_size >= "
                         f"{8 * math.ceil(needs / 8 / loss.equivariance_min_scale)} (the paper trains at 256)")


def validate_fp16_safe(cfg: TrainConfig) -> None:
    """``fp16_safe``: a kl-f8 codec to start from, a bound fp16 holds, the teacher-matching loss alone."""
    bound = cfg.fp16_safe.bound
    if not (0 < bound < FP16_MAX):  # nan fails too
        raise ValueError(f"fp16_safe.bound {bound} must be in (0, {FP16_MAX:.0f}): fp16 cannot hold activations "
                         f"beyond its largest finite value, {FP16_MAX:.0f}; use a bound well inside, e.g. 1000 "
                         "(or 0 for off)")
    if cfg.model.kind != "kl-f8" or not cfg.model.init_from:
        raise ValueError("fp16_safe.bound > 0 fine-tunes an existing kl-f8 codec: set model.init_from to its folder "
                         f"(model.kind kl-f8; got kind {cfg.model.kind}, init_from {cfg.model.init_from})")
    # Its loss is the teacher's outputs plus the bound; these would be ignored, so they are refused.
    unsupported = {"loss.disc_weight": cfg.loss.disc_weight > 0, "loss.equivariance_weight":
                   cfg.loss.equivariance_weight > 0, "loss.learn_logvar": cfg.loss.learn_logvar,
                   "loss.vf_weight": cfg.loss.vf_weight > 0, "model.train_decoder_only": cfg.model.train_decoder_only,
                   # the penalty is taken in forward hooks, which a checkpointed recompute would skip
                   "model.gradient_checkpointing": cfg.model.gradient_checkpointing,
                   "model.latent_channels": cfg.model.latent_channels is not None}
    bad = [k for k, on in unsupported.items() if on]
    if bad:
        raise ValueError(f"fp16_safe: {bad} do not apply to the fp16-safe fine-tune (it matches the original "
                         "codec's outputs); unset them")
    from codec.sources.kinds import is_stream  # late: a config error must not wait for torch

    if any(is_stream(s, cfg.data.streaming) for s in cfg.data.train):
        raise ValueError("fp16_safe measures the codec's activations on the first training images before it starts: "
                         "use indexed sources (folders, .tar shards, datasets), not streams")


def validate_vf(cfg: TrainConfig) -> None:
    """VA-VAE's alignment: a kl-f8 encoder that trains, and crops with a whole token grid."""
    if cfg.model.kind != "kl-f8":
        raise ValueError(f"loss.vf_weight aligns a kl-f8 codec's latents; model.kind {cfg.model.kind} is refused "
                         "(an MLP VAE has no latent grid, a distilled student's latents are its teacher's): set "
                         "loss.vf_weight=0")
    if cfg.model.train_decoder_only:
        raise ValueError("loss.vf_weight trains the encoder, which model.train_decoder_only freezes; unset one")
    if cfg.loss.equivariance_weight > 0:
        raise ValueError("loss.vf_weight with loss.equivariance_weight: EQ-VAE's transformed steps change the "
                         "images the latents come from; use one of them")
    if cfg.data.crop_size % 16:
        raise ValueError(f"loss.vf_weight: the foundation model's token grid (one token per 16 px) cannot be "
                         f"matched to the {cfg.data.crop_size // 8}x{cfg.data.crop_size // 8} latent grid of "
                         f"{cfg.data.crop_size}-px crops; use a data.crop_size that is a multiple of 16")


def validate_data(cfg: TrainConfig) -> None:
    """``data``: one kind of source (streamed or indexed), crops the model can take."""
    if cfg.data.train:
        from codec.sources.kinds import is_stream  # late: a config error must not wait for torch

        streamed = [src for src in cfg.data.train if is_stream(src, cfg.data.streaming)]
        if streamed and len(streamed) != len(cfg.data.train):
            raise ValueError(f"data.train mixes streamed sources {streamed} with indexed ones; use one kind")
        if streamed and cfg.model.kind == "mlp-vae":
            raise ValueError("model.kind mlp-vae trains on indexed data (folders, tars, arrays), not streams")
    if not 0 < cfg.data.crop_min_fraction <= 1:
        raise ValueError(f"data.crop_min_fraction must be in (0, 1], got {cfg.data.crop_min_fraction}")
    if cfg.data.crop_size % 8 or cfg.data.crop_size < 8:
        raise ValueError(f"data.crop_size must be a positive multiple of 8, got {cfg.data.crop_size}")
    if cfg.data.val_crop % 8:
        raise ValueError(f"data.val_crop must be a multiple of 8 (or 0), got {cfg.data.val_crop}")
    if not cfg.data.train:
        raise ValueError("data.train is empty: set it to an image folder, e.g. --set data.train=DIR")


def validate_mlp(cfg: TrainConfig) -> None:
    """``model.kind: mlp-vae``: what the vanilla VAE can and cannot take."""
    # The ELBO (section mlp) replaces the kl-f8 loss; its options must be off, not ignored.
    unsupported = {"loss.disc_weight": cfg.loss.disc_weight > 0, "loss.learn_logvar": cfg.loss.learn_logvar,
                   "loss.perceptual_weight": cfg.loss.perceptual_weight > 0,
                   "model.train_decoder_only": cfg.model.train_decoder_only,
                   "model.gradient_checkpointing": cfg.model.gradient_checkpointing}
    bad = [k for k, on in unsupported.items() if on]
    if bad:
        raise ValueError(f"model.kind mlp-vae: {bad} apply to kl-f8 only; unset them")
    if cfg.mlp.latent_size < 1 or cfg.mlp.image_size < 1 or cfg.mlp.in_channels not in (1, 3):
        raise ValueError("mlp.latent_size and mlp.image_size must be >= 1, mlp.in_channels 1 or 3")
    if cfg.data.val and cfg.data.val_crop != cfg.mlp.image_size:
        raise ValueError(
            f"data.val with model.kind mlp-vae: set data.val_crop={cfg.mlp.image_size} "
            f"(the MLP's fixed image size), got {cfg.data.val_crop}"
        )


def validate_student(cfg: TrainConfig) -> None:
    """``model.kind: autoencoder-tiny``: what a distilled student can and cannot take."""
    if not cfg.distill.teacher:
        raise ValueError("model.kind autoencoder-tiny needs distill.teacher: an AutoencoderKL folder or file")
    unsupported = {
        "loss.learn_logvar": cfg.loss.learn_logvar,  # no posterior, no Gaussian likelihood
        "model.train_decoder_only": cfg.model.train_decoder_only,  # distill.train=decoder says it
        # diffusers' EncoderTiny skips its [-1, 1] -> [0, 1] input rescale under checkpointing
        "model.gradient_checkpointing": cfg.model.gradient_checkpointing,
        "loss.disc_weight with distill.train=encoder": cfg.loss.disc_weight > 0 and cfg.distill.train == "encoder",
    }
    bad = [k for k, on in unsupported.items() if on]
    if bad:
        raise ValueError(f"model.kind autoencoder-tiny: {bad} do not apply to a distilled student; unset them")
    if cfg.distill.latent_weight < 0:
        raise ValueError(f"distill.latent_weight must be >= 0, got {cfg.distill.latent_weight}")

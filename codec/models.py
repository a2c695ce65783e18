"""Named presets that build ``diffusers.AutoencoderKL``, the KL-regularised autoencoder of
Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion Models").

We never re-implement the network: diffusers' class *is* the format every pipeline loads.
All presets are "kl-f8": three 2x downsamplings (8x) to 4 latent channels.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffusers import AutoencoderKL

from codec.io import CodecLoadError, is_autoencoder_tiny, is_mlp_vae

# Shared by every preset: the kl-f8 topology of Stable Diffusion.
_KL_F8 = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    act_fn="silu",
)

# SD3 and FLUX.1: 16 latent channels, the moments straight from the encoder's last conv.
_KL_F8_C16 = dict(_KL_F8, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)

# The `tiny` preset's widths and depth, shared by its 4- and 16-channel versions.
_TINY_SHAPE = dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=16, sample_size=128)

_SD3_F8C16 = dict(_KL_F8_C16, block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                  sample_size=1024)

# name -> (AutoencoderKL kwargs, one-line cost note for the README / --help)
PRESETS: dict[str, dict] = {
    # The exact Stable Diffusion 1.x/2.x VAE (83.65 M parameters; 271/620 GFLOP enc/dec at 256²).
    "sd-kl-f8": dict(
        _KL_F8,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        norm_num_groups=32,
        sample_size=256,
        scaling_factor=0.18215,
    ),
    # A quarter of the width: trains on one consumer GPU, or slowly on a CPU.
    "small": dict(
        _KL_F8,
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        norm_num_groups=32,
        sample_size=256,
        scaling_factor=1.0,
    ),
    # For CPUs and tests: narrow, one ResNet block per level.
    "tiny": dict(_TINY_SHAPE, **_KL_F8, scaling_factor=1.0),
    # SD3's VAE (83.8 M parameters): the kl-f8 topology with 16 latent channels and no
    # quant_conv / post_quant_conv; latents normalised by scale and shift.
    "sd3-f8c16": dict(_SD3_F8C16, scaling_factor=1.5305, shift_factor=0.0609),
    # FLUX.1's VAE: the same network as SD3's, its own factors.
    "flux-f8c16": dict(_SD3_F8C16, scaling_factor=0.3611, shift_factor=0.1159),
    # The SD3/FLUX.1 layout at the `tiny` preset's CPU size (factors measured at export).
    "tiny-c16": dict(_TINY_SHAPE, **_KL_F8_C16, scaling_factor=1.0, shift_factor=0.0),
    # Unit tests only: the smallest kl-f8 diffusers accepts.
    "test": dict(
        _KL_F8,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=1.0,
    ),
}


# AutoencoderTiny students (train.distill): name -> AutoencoderTiny kwargs. Their latents are the
# teacher's scaled ones, so scaling_factor stays 1 and shift 0 (TAESD's convention).
STUDENT_PRESETS: dict[str, dict] = {
    # TAESD's own shape (diffusers' defaults, 2.4 M parameters): for Stable Diffusion-sized teachers.
    "taesd": dict(encoder_block_out_channels=(64, 64, 64, 64), decoder_block_out_channels=(64, 64, 64, 64),
                  num_encoder_blocks=(1, 3, 3, 3), num_decoder_blocks=(3, 3, 3, 1)),
    # Half the width and fewer blocks: a preview decoder for the CPU-sized `tiny` teacher.
    "taesd-small": dict(encoder_block_out_channels=(32, 32, 32, 32), decoder_block_out_channels=(32, 32, 32, 32),
                        num_encoder_blocks=(1, 2, 2, 2), num_decoder_blocks=(2, 2, 2, 1)),
    # Unit tests only.
    "test": dict(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                 num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1)),
}


def build_student(preset: str, latent_channels: int = 4):
    """A freshly initialised diffusers ``AutoencoderTiny`` of a named student preset."""
    from diffusers import AutoencoderTiny

    if preset not in STUDENT_PRESETS:
        raise ValueError(f"unknown student preset {preset!r}; choose from {sorted(STUDENT_PRESETS)}")
    return AutoencoderTiny(**STUDENT_PRESETS[preset], latent_channels=latent_channels,
                           scaling_factor=1.0, shift_factor=0.0)


def build_autoencoder(preset: str, latent_channels: int | None = None) -> AutoencoderKL:
    """A freshly initialised ``AutoencoderKL`` of a named preset (``latent_channels``: instead of
    the preset's own)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose from {sorted(PRESETS)}")
    kwargs = dict(PRESETS[preset])
    if latent_channels is not None:
        kwargs["latent_channels"] = latent_channels
    return AutoencoderKL(**kwargs)


def load_autoencoder(path: str | os.PathLike, subfolder: str | None = None) -> AutoencoderKL:
    """Load a diffusers ``AutoencoderKL`` folder (local path or hub id) for fine-tuning or use.

    A Stable Diffusion pipeline folder works too: its VAE is found in the ``vae`` subfolder,
    and so does a single-file ``.safetensors`` in the CompVis/LDM layout (:mod:`codec.single_file`).
    A folder whose config names ``MLPVAE`` (the vanilla VAE baseline) or ``AutoencoderTiny``
    (a TAESD-style preview codec, e.g. from ``python -m train.distill``) loads as that class.
    Weights are read from safetensors only (never unpickled); a malformed ``config.json`` or
    weights file raises :class:`CodecLoadError` naming it.
    """
    local = Path(path)
    if local.is_file() and local.suffix == ".safetensors":
        from codec.single_file import load_single_file

        return load_single_file(local)[0]
    if local.exists():
        if subfolder is None and not (local / "config.json").exists() and (local / "vae").is_dir():
            subfolder = "vae"
        cfg = local / (subfolder or "") / "config.json"
        if not cfg.exists():
            raise FileNotFoundError(
                f"{local}: no config.json here; pass a diffusers AutoencoderKL folder "
                "(config.json + diffusion_pytorch_model.safetensors) or a pipeline folder with vae/"
            )
    elif not looks_like_hub_id(str(path)):  # a mistyped local path fails now, not after the hub's retries
        raise FileNotFoundError(f"{path}: no such codec folder or file (and not a Hugging Face Hub id "
                                "like 'stabilityai/sd-vae-ft-mse')")
    # use_safetensors: a folder holding only a pickled .bin is refused rather than unpickled.
    try:
        if is_mlp_vae(local):
            from codec.baseline.mlp_vae import MLPVAE

            return MLPVAE.from_pretrained(str(path), subfolder=subfolder, use_safetensors=True)
        if is_autoencoder_tiny(local):
            from diffusers import AutoencoderTiny

            return AutoencoderTiny.from_pretrained(str(path), subfolder=subfolder, use_safetensors=True)
        return AutoencoderKL.from_pretrained(str(path), subfolder=subfolder, use_safetensors=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CodecLoadError(f"{path}: cannot load the codec ({type(exc).__name__}: {exc})") from exc


def looks_like_hub_id(name: str) -> bool:
    """``org/name`` on the Hub, rather than a local path: one slash, no ./, ../, ~ or absolute path,
    no .safetensors suffix, and no local folder of the ``org`` part (``runs/t1`` is local)."""
    parts = name.split("/")
    return (len(parts) == 2 and all(parts) and not name.startswith(("/", "~", "."))
            and not name.endswith(".safetensors") and not Path(parts[0]).exists())


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())

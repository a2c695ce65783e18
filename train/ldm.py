"""``python -m train.ldm CONFIG [--set a.b=c ...]``: a latent diffusion model on latents made by
``vae-codec compress`` (the trainer: :mod:`train.diffusion`). Also ``accelerate launch -m train.ldm``."""

from __future__ import annotations

import sys

from codec.launch import relaunch_if_needed
from train.common.config import config_parser
from train.diffusion.config import LDMConfig, load_ldm_config, validate_ldm


def main(argv: list[str] | None = None) -> int:
    parser = config_parser("train.ldm", "Train a latent diffusion UNet (DDPM) on latents made by `vae-codec compress`.",
                           "configs/ldm-*.yaml", "--set data.latents=/data/latents", LDMConfig)
    args = parser.parse_args(argv)
    relaunched = relaunch_if_needed("train.ldm", sys.argv[1:] if argv is None else argv)
    if relaunched is not None:
        return relaunched
    try:
        cfg = load_ldm_config(args.config, args.overrides)
        validate_ldm(cfg)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    from train.common.command import run_command
    from train.diffusion.loop import train_ldm  # imported late: `--help` and config errors stay instant

    return run_command("train.ldm", lambda: train_ldm(cfg))


if __name__ == "__main__":
    sys.exit(main())


def __getattr__(name: str):
    """The trainer's public names (``from train.ldm import sample_latents``), imported when asked."""
    modules = {"LatentStream": "train.diffusion.data", "build_unet": "train.diffusion.model",
               "sample_latents": "train.diffusion.model", "train_ldm": "train.diffusion.loop"}
    if name not in modules:
        raise AttributeError(f"module 'train.ldm' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(modules[name]), name)

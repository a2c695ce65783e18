"""``python -m train CONFIG [--set a.b=c ...]`` (also under ``accelerate launch -m train``)."""

from __future__ import annotations

import sys

from codec.launch import relaunch_if_needed
from train.autoencoder.config import TrainConfig, config_parser, load_config, validate


def main(argv: list[str] | None = None, module: str = "train",
         description: str = "Train a kl-f8 autoencoder (KL + reconstruction + LPIPS [+ PatchGAN]) under accelerate.",
         example: str = "--set optim.lr=2e-4 --set data.train=/data/images", forced: tuple[str, ...] = ()) -> int:
    """``forced``: overrides applied after the config file and every ``--set`` (``train.distill``
    forces its model kind this way)."""
    parser = config_parser(module, description, "configs/*.yaml", example, TrainConfig)
    args = parser.parse_args(argv)
    relaunched = relaunch_if_needed(module, sys.argv[1:] if argv is None else argv)
    if relaunched is not None:
        return relaunched
    try:
        cfg = load_config(args.config, [*args.overrides, *forced])
        validate(cfg)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    from train.autoencoder.loop import train  # imported late: `--help` and config errors stay instant
    from train.common.command import run_command

    return run_command(module, lambda: train(cfg))

if __name__ == "__main__":
    sys.exit(main())

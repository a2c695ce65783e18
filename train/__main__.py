"""``python -m train CONFIG [--set a.b=c ...]`` (also under ``accelerate launch -m train``)."""

from __future__ import annotations

import argparse
import sys

from codec.launch import relaunch_if_needed
from train.config import load_config, validate


def main(argv: list[str] | None = None, prog: str = "python -m train") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a kl-f8 autoencoder (KL + reconstruction + LPIPS [+ PatchGAN]) under accelerate.",
    )
    parser.add_argument("config", nargs="?", help="YAML file overriding the defaults (configs/*.yaml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one setting, e.g. --set optim.lr=2e-4 --set data.train=/data/images",
    )
    args = parser.parse_args(argv)
    relaunched = relaunch_if_needed("train", sys.argv[1:] if argv is None else argv)
    if relaunched is not None:
        return relaunched
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    from train.guards import NonFiniteLossError
    from train.loop import TrainingInterrupted, train  # imported late: `--help` and config errors stay instant

    try:
        train(cfg)
    except TrainingInterrupted:
        return 130  # the shell's code for Ctrl-C; the checkpoint is saved and was announced
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
